"""deploy/kubernetes/ and deploy/Dockerfile.cuda, checked without a cluster or a Docker engine.

- Every manifest is validated against the real schemas: Kubernetes' own kinds with
  kubernetes-validate (strict: an unknown field is an error) at pinned Kubernetes versions; the
  InferencePool and the HTTPRoute against the OpenAPI schemas of their CRDs, vendored in
  tests/fixtures/crds/ (unknown fields are errors there too, `metadata` is checked as Kubernetes'
  ObjectMeta, and every CEL rule of the CRD that applies to our objects is checked by a Python
  equivalent: a rule without one fails the test rather than passing unseen).
- The manifests are cross-checked: selectors, ports, probes, the shutdown budget, the autoscaler's
  target and metric, envFrom names, flags that `plait serve`'s own parser must accept, the
  kustomization's list, the endpoint picker's values, the image.
- The validators themselves are shown to reject broken copies of the manifests.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
MANIFESTS = DEPLOY / "kubernetes"
CRDS = REPO / "tests" / "fixtures" / "crds"

# The oldest Kubernetes that deploy/README.md claims, and a newer one (kubernetes-validate ships the
# schemas of both): a field removed or renamed between them fails one of the two.
KUBERNETES_VERSIONS = ("1.33.0", "1.35.0")

# Kinds that kubernetes-validate has no schema for, validated against their vendored CRDs instead.
CRD_FILES = {
    ("inference.networking.k8s.io", "InferencePool"): "inference.networking.k8s.io_inferencepools.yaml",
    ("gateway.networking.k8s.io", "HTTPRoute"): "gateway.networking.k8s.io_httproutes.yaml",
}

# Manifests in deploy/kubernetes/ that `kubectl apply -k` must not apply.
NOT_APPLIED = {"secret-template.yaml"}
SECRET_KEYS = {"PLAIT_API_KEY", "PLAIT_ADMIN_KEY", "PLAIT_DATABASE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
HEALTH = "/health"
PORT = 8000
EPP_RELEASE = "plait"  # the Helm release name deploy/README.md installs the endpoint picker under


class InvalidManifest(AssertionError):
    """A manifest that the API server (or kubectl's strict field validation) would refuse."""


# --- reading -------------------------------------------------------------------------------------


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest_files() -> list[Path]:
    """The Kubernetes manifests: every YAML file at the top of deploy/kubernetes/ but the kustomization
    (the Helm values in its subfolders are not manifests)."""
    return sorted(p for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml")


def kustomization() -> dict:
    return yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())


def applied_documents() -> list[dict]:
    return [doc for name in kustomization()["resources"] for doc in load_documents(MANIFESTS / name)]


def all_documents() -> list[dict]:
    return [doc for path in manifest_files() for doc in load_documents(path)]


def find(kind: str, name: str, documents: list[dict] | None = None) -> dict:
    found = [d for d in documents or all_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name!r}, found {len(found)}"
    return found[0]


def serving() -> dict:
    return find("Deployment", "plait")


def trainer() -> dict:
    return find("Deployment", "plait-trainer")


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container per Plait pod"
    return containers[0]


def pod_labels(deployment: dict) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(match_labels: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in match_labels.items())


def container_port(deployment: dict, port: int | str) -> int:
    """A probe's or a Service's port, by number or by the container port's name."""
    ports = container(deployment)["ports"]
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in ports], f"{port} is not a container port"
        return port
    named = [p["containerPort"] for p in ports if p.get("name") == port]
    assert named, f"no container port named {port!r}"
    return named[0]


def helm_values(name: str) -> dict:
    return yaml.safe_load((MANIFESTS / name / "values.yaml").read_text())


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not (stripped or pending):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


# --- validation against schemas ------------------------------------------------------------------


@cache
def crd_schema(group: str, kind: str, version: str) -> dict:
    """`spec.versions[version].schema.openAPIV3Schema` of the vendored CRD of `kind`."""
    crd = yaml.safe_load((CRDS / CRD_FILES[group, kind]).read_text())
    assert crd["kind"] == "CustomResourceDefinition"
    assert (crd["spec"]["group"], crd["spec"]["names"]["kind"]) == (group, kind)
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            assert entry["served"], f"{kind} {version} is not served by the vendored CRD"
            return entry["schema"]["openAPIV3Schema"]
    raise InvalidManifest(f"{group}/{version} {kind} is not a version of the vendored CRD")


def closed(schema: Any) -> Any:
    """The schema with unknown fields refused: the API server prunes fields a structural schema does
    not name, and kubectl's default strict field validation turns that into an error."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: closed(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


@cache
def object_meta_validator(kubernetes_version: str) -> jsonschema.protocols.Validator:
    """Kubernetes' ObjectMeta from kubernetes-validate's strict schemas, for the CRD objects' metadata
    (a CRD's own schema says only `type: object` there)."""
    folder = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{kubernetes_version}-local-strict"
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    reference = f"{definitions['$id']}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    return jsonschema.Draft202012Validator({"$ref": reference}, registry=registry)


def validate_against_crd(document: dict, kubernetes_version: str) -> None:
    group, _, version = document["apiVersion"].rpartition("/")
    schema = crd_schema(group, document["kind"], version)
    problems = [
        f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in jsonschema.Draft4Validator(closed(schema)).iter_errors(document)
    ]
    problems += [
        f"metadata.{'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in object_meta_validator(kubernetes_version).iter_errors(document.get("metadata", {}))
    ]
    problems += [f"{path}: {message}" for path, message in broken_cel_rules(document, schema)]
    if problems:
        raise InvalidManifest(f"{document['kind']} {document['metadata'].get('name')}: " + "; ".join(problems))


def validate_document(document: dict, kubernetes_version: str) -> None:
    group = document["apiVersion"].rpartition("/")[0]
    if (group, document["kind"]) in CRD_FILES:
        validate_against_crd(document, kubernetes_version)
        return
    try:
        # Raises SchemaNotFoundError for a kind it does not know: that fails the test, it is not
        # skipped (kubernetes-validate's command line would only warn).
        kubernetes_validate.validate(document, kubernetes_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(map(str, error.path)) or "<root>"
        raise InvalidManifest(
            f"{document['kind']} {document['metadata'].get('name')}: {path}: {error.message}"
        ) from None


# --- CEL rules (x-kubernetes-validations) ----------------------------------------------------------
# jsonschema cannot evaluate CEL, so each rule the vendored CRDs put on a node our objects use has a
# Python equivalent here, keyed by the rule's message, with the CRD's defaults applied as the API
# server does before it evaluates them. A rule met without an equivalent fails the test.


def _parent_key(ref: dict) -> tuple:
    return (
        ref.get("group", "gateway.networking.k8s.io"),
        ref.get("kind", "Gateway"),
        ref["name"],
        ref.get("namespace") or "",
    )


def _duration_seconds(value: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(int(number) * units[unit] for number, unit in re.findall(r"(\d+)(ms|h|m|s)", value))


def _path_rule(check: Callable[[str], bool]) -> Callable[[dict], bool]:
    return lambda path: path.get("type", "PathPrefix") not in ("Exact", "PathPrefix") or check(path["value"])


def _replace_prefix(holder: dict, kind: str) -> bool:
    return any(
        (f.get(kind) or {}).get("path", {}).get("type") == "ReplacePrefixMatch"
        and "replacePrefixMatch" in f[kind]["path"]
        for f in holder.get("filters", [])
    )


def _one_path_prefix_match(rule: dict) -> bool:
    matches = rule.get("matches", [{"path": {"type": "PathPrefix", "value": "/"}}])
    return len(matches) == 1 and matches[0].get("path", {}).get("type") == "PathPrefix"


VALID_PATH = re.compile(r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$")

CEL_EQUIVALENTS: dict[str, Callable[[Any], bool]] = {
    # InferencePool
    "port number must be unique": lambda ports: len({p["number"] for p in ports}) == len(ports),
    "port is required when kind is 'Service' or unspecified (defaults to 'Service')": (
        lambda ref: ref.get("kind", "Service") != "Service" or "port" in ref
    ),
    # HTTPRoute: parent references
    "sectionName must be specified when parentRefs includes 2 or more references to the same parent": (
        lambda refs: all(
            bool(a.get("sectionName")) == bool(b.get("sectionName"))
            for a in refs
            for b in refs
            if _parent_key(a) == _parent_key(b)
        )
    ),
    "sectionName must be unique when parentRefs includes 2 or more references to the same parent": (
        lambda refs: len({(*_parent_key(r), r.get("sectionName") or "") for r in refs}) == len(refs)
    ),
    # HTTPRoute: rules
    "While 16 rules and 64 matches per rule are allowed, the total number of matches across all rules in a route "
    "must be less than 128": lambda rules: sum(len(r.get("matches", [{}])) for r in rules) <= 128,
    "RequestRedirect filter must not be used together with backendRefs": (
        lambda rule: not rule.get("backendRefs") or not any("requestRedirect" in f for f in rule.get("filters", []))
    ),
    "When using RequestRedirect filter with path.replacePrefixMatch, exactly one PathPrefix match must be "
    "specified": lambda rule: not _replace_prefix(rule, "requestRedirect") or _one_path_prefix_match(rule),
    "When using URLRewrite filter with path.replacePrefixMatch, exactly one PathPrefix match must be specified": (
        lambda rule: not _replace_prefix(rule, "urlRewrite") or _one_path_prefix_match(rule)
    ),
    "Within backendRefs, when using RequestRedirect filter with path.replacePrefixMatch, exactly one PathPrefix "
    "match must be specified": (
        lambda rule: (
            not any(_replace_prefix(b, "requestRedirect") for b in rule.get("backendRefs", []))
            or _one_path_prefix_match(rule)
        )
    ),
    "Within backendRefs, When using URLRewrite filter with path.replacePrefixMatch, exactly one PathPrefix match "
    "must be specified": (
        lambda rule: (
            not any(_replace_prefix(b, "urlRewrite") for b in rule.get("backendRefs", []))
            or _one_path_prefix_match(rule)
        )
    ),
    "Must have port for Service reference": (
        lambda ref: not (ref.get("group", "") == "" and ref.get("kind", "Service") == "Service") or "port" in ref
    ),
    "backendRequest timeout cannot be longer than request timeout": (
        lambda t: (
            not ("request" in t and "backendRequest" in t)
            or _duration_seconds(t["request"]) == 0
            or _duration_seconds(t["backendRequest"]) <= _duration_seconds(t["request"])
        )
    ),
    # HTTPRoute: path matches
    "value must be an absolute path and start with '/' when type one of ['Exact', 'PathPrefix']": _path_rule(
        lambda v: v.startswith("/")
    ),
    "must not contain '//' when type one of ['Exact', 'PathPrefix']": _path_rule(lambda v: "//" not in v),
    "must not contain '/./' when type one of ['Exact', 'PathPrefix']": _path_rule(lambda v: "/./" not in v),
    "must not contain '/../' when type one of ['Exact', 'PathPrefix']": _path_rule(lambda v: "/../" not in v),
    "must not contain '%2f' when type one of ['Exact', 'PathPrefix']": _path_rule(lambda v: "%2f" not in v),
    "must not contain '%2F' when type one of ['Exact', 'PathPrefix']": _path_rule(lambda v: "%2F" not in v),
    "must not contain '#' when type one of ['Exact', 'PathPrefix']": _path_rule(lambda v: "#" not in v),
    "must not end with '/..' when type one of ['Exact', 'PathPrefix']": _path_rule(lambda v: not v.endswith("/..")),
    "must not end with '/.' when type one of ['Exact', 'PathPrefix']": _path_rule(lambda v: not v.endswith("/.")),
    "type must be one of ['Exact', 'PathPrefix', 'RegularExpression']": (
        lambda path: path.get("type", "PathPrefix") in ("Exact", "PathPrefix", "RegularExpression")
    ),
    "must only contain valid characters (matching ^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$) for "
    "types ['Exact', 'PathPrefix']": _path_rule(lambda v: VALID_PATH.fullmatch(v) is not None),
}


def cel_rules(value: Any, schema: dict | None, path: str = "") -> Iterator[tuple[str, str, str, Any]]:
    """(path, rule, message, value) for every CEL rule on a schema node that `value` instantiates."""
    if not schema:
        return
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule["rule"], rule.get("message", rule["rule"]), value
    if isinstance(value, dict):
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            child = schema.get("properties", {}).get(key, extra if isinstance(extra, dict) else None)
            yield from cel_rules(item, child, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from cel_rules(item, schema.get("items"), f"{path}[{index}]")


def broken_cel_rules(document: dict, schema: dict) -> list[tuple[str, str]]:
    broken = []
    for path, rule, message, value in cel_rules(document, schema):
        check = CEL_EQUIVALENTS.get(message)
        if check is None:
            broken.append((path, f"CEL rule with no Python equivalent in this test, so unchecked: {rule}"))
        elif not check(value):
            broken.append((path, message))
    return broken


# --- every manifest against the schemas ----------------------------------------------------------


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_every_manifest_is_valid(path, kubernetes_version):
    documents = load_documents(path)
    assert documents, f"{path.name} holds no object"
    for document in documents:
        validate_document(document, kubernetes_version)


def test_the_folder_has_the_objects_a_platform_team_applies():
    kinds = sorted((d["apiVersion"], d["kind"]) for d in applied_documents())
    assert kinds == sorted(
        [
            ("v1", "Namespace"),
            ("v1", "ConfigMap"),
            ("apps/v1", "Deployment"),
            ("apps/v1", "Deployment"),
            ("v1", "Service"),
            ("inference.networking.k8s.io/v1", "InferencePool"),
            ("gateway.networking.k8s.io/v1", "HTTPRoute"),
            ("policy/v1", "PodDisruptionBudget"),
            ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ]
    )


def test_kubernetes_validate_has_no_schema_for_the_crd_kinds():
    """Why the CRD kinds go to their vendored schemas: kubernetes-validate raises SchemaNotFoundError
    for them (any other kind it does not know fails test_every_manifest_is_valid the same way)."""
    crd_documents = [d for d in all_documents() if (d["apiVersion"].rpartition("/")[0], d["kind"]) in CRD_FILES]
    assert {d["kind"] for d in crd_documents} == {"InferencePool", "HTTPRoute"}
    for document in crd_documents:
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(document, KUBERNETES_VERSIONS[0], strict=True)


def test_the_vendored_crds_name_their_source():
    for name in CRD_FILES.values():
        header = (CRDS / name).read_text().split("apiVersion:", 1)[0]
        assert re.search(r"^# Repository: https://github\.com/kubernetes-sigs/[\w-]+$", header, re.M), name
        assert re.search(r"^# Path: config/crd/\S+\.yaml", header, re.M), name
        assert re.search(r"^# Release: v\d+\.\d+\.\d+, commit [0-9a-f]{40}$", header, re.M), name


def _set(document: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node: Any = document
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


_DELETE = object()

BROKEN = [
    # Kubernetes' own kinds, through kubernetes-validate
    ("deployment.yaml", "spec.template.spec.containers.0.resorces", {"limits": {}}),
    ("deployment.yaml", "spec.template.spec.terminationGracePeriodSeconds", "60"),
    ("service.yaml", "spec.ports.0.port", "http"),
    ("hpa.yaml", "spec.metrics.0.pods.metric", _DELETE),
    ("pdb.yaml", "spec.maxUnavailabel", 1),
    # the CRD kinds: their OpenAPI schemas, unknown fields, ObjectMeta, CEL rules
    ("inferencepool.yaml", "spec.targetPorts.0.number", 70000),
    ("inferencepool.yaml", "spec.targetPort", 8000),
    ("inferencepool.yaml", "spec.endpointPickerRef.failureMode", "FailSafe"),
    ("inferencepool.yaml", "spec.endpointPickerRef.port", _DELETE),
    ("inferencepool.yaml", "spec.targetPorts", [{"number": 8000}, {"number": 8000}]),
    ("inferencepool.yaml", "metadata.labelz", {"a": "b"}),
    ("httproute.yaml", "spec.rules.0.matches.0.path.value", "v1/chat/completions"),
    ("httproute.yaml", "spec.rules.1.backendRefs.0.port", _DELETE),
    ("httproute.yaml", "spec.rules.0.timeouts.request", "ten minutes"),
    ("httproute.yaml", "spec.rules.0.backendRef", []),
    ("httproute.yaml", "spec.rules.0.timeouts.backendRequest", "900s"),
]


@pytest.mark.parametrize(("name", "field", "value"), BROKEN, ids=[f"{n}:{f}" for n, f, _ in BROKEN])
def test_the_validation_rejects_a_broken_manifest(name, field, value):
    (document,) = load_documents(MANIFESTS / name)
    validate_document(document, KUBERNETES_VERSIONS[0])  # as committed: valid
    broken = copy.deepcopy(document)
    _set(broken, field, value)
    with pytest.raises(InvalidManifest):
        validate_document(broken, KUBERNETES_VERSIONS[0])


def test_an_unknown_kind_is_not_passed_silently():
    document = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate_document(document, KUBERNETES_VERSIONS[0])


# --- the kustomization ---------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_but_the_secret_template():
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed)), "a file listed twice"
    assert set(listed) == {p.name for p in manifest_files()} - NOT_APPLIED
    assert "secret-template.yaml" not in listed, "`kubectl apply -k` would overwrite the real Secret"


def test_kustomization_sets_the_namespace_and_the_image():
    k = kustomization()
    assert find("Namespace", k["namespace"], applied_documents())
    for document in applied_documents():
        assert "namespace" not in document["metadata"], "the kustomization sets every object's namespace"
    images = {entry["name"] for entry in k["images"]}
    for deployment in (serving(), trainer()):
        assert container(deployment)["image"] in images, "the kustomization must set the image's registry and tag"


def _kustomize_build() -> list[dict]:
    if shutil.which("kustomize"):
        command = ["kustomize", "build", str(MANIFESTS)]
    elif shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(MANIFESTS)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed")
    built = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


def test_kustomize_builds_what_kubectl_apply_k_applies():
    """The folder as `kubectl apply -k` renders it (kustomize runs offline): the same objects, each
    in the namespace, the image replaced, and still valid."""
    built = _kustomize_build()
    k = kustomization()
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in applied_documents()
    )
    (image,) = k["images"]
    for document in built:
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == k["namespace"], document["kind"]
        if document["kind"] == "Deployment":
            assert container(document)["image"] == f"{image['newName']}:{image['newTag']}"
        validate_document(document, KUBERNETES_VERSIONS[0])


# --- selectors, ports, probes --------------------------------------------------------------------


def test_selectors_pick_the_serving_pods_and_never_the_trainer():
    serving_labels, trainer_labels = pod_labels(serving()), pod_labels(trainer())
    for deployment in (serving(), trainer()):
        assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels(deployment))
    assert not selects(serving()["spec"]["selector"]["matchLabels"], trainer_labels)
    assert not selects(trainer()["spec"]["selector"]["matchLabels"], serving_labels)

    selectors = {
        "Service": find("Service", "plait")["spec"]["selector"],
        "InferencePool": find("InferencePool", "plait")["spec"]["selector"]["matchLabels"],
        "PodDisruptionBudget": find("PodDisruptionBudget", "plait")["spec"]["selector"]["matchLabels"],
        "topology spread": serving()["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["labelSelector"][
            "matchLabels"
        ],
        "endpoint picker values": helm_values("epp")["inferencePool"]["modelServers"]["matchLabels"],
    }
    for what, selector in selectors.items():
        assert selector, f"{what}: an empty selector selects everything"
        assert selects(selector, serving_labels), f"{what} does not select the serving pods"
        assert not selects(selector, trainer_labels), f"{what} selects the trainer, which takes no traffic"


def test_ports_line_up_from_the_image_to_the_gateway():
    assert container_port(serving(), "http") == container_port(trainer(), "http") == PORT
    service = find("Service", "plait")
    (service_port,) = service["spec"]["ports"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service_port["name"] == "http"
    assert service_port["port"] == PORT
    assert container_port(serving(), service_port["targetPort"]) == PORT

    pool = find("InferencePool", "plait")
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [PORT]
    assert helm_values("epp")["inferencePool"]["targetPorts"] == pool["spec"]["targetPorts"]

    # The chart names the EPP's Service `<release>-epp` and serves ext-proc on 9002, and makes the
    # EPP watch the pool named like the release.
    assert pool["metadata"]["name"] == EPP_RELEASE
    assert pool["spec"]["endpointPickerRef"]["name"] == f"{EPP_RELEASE}-epp"
    assert pool["spec"]["endpointPickerRef"]["port"]["number"] == 9002

    route = find("HTTPRoute", "plait")
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    to_pool = [b for b in backends if b.get("kind") == "InferencePool"]
    to_service = [b for b in backends if b.get("kind", "Service") == "Service"]
    assert [(b["group"], b["name"]) for b in to_pool] == [("inference.networking.k8s.io", pool["metadata"]["name"])]
    assert [(b["name"], b["port"]) for b in to_service] == [(service["metadata"]["name"], service_port["port"])]


def test_the_route_sends_generation_to_the_pool_and_the_rest_of_v1_to_the_service():
    """Gateway API picks the longest matching path: exact generation paths beat the /v1 prefix."""
    rules = find("HTTPRoute", "plait")["spec"]["rules"]

    def backend(path: str) -> str:
        candidates = []
        for rule in rules:
            for match in rule["matches"]:
                kind, value = match["path"]["type"], match["path"]["value"]
                if (kind == "Exact" and path == value) or (
                    kind == "PathPrefix" and (path == value or path.startswith(value.rstrip("/") + "/"))
                ):
                    candidates.append((kind == "Exact", len(value), rule["backendRefs"][0]["kind"]))
        assert candidates, f"{path} is not routed"
        return max(candidates)[2]

    for path in ("/v1/chat/completions", "/v1/completions"):
        assert backend(path) == "InferencePool"
    for path in ("/v1/models", "/v1/adapters", "/v1/files", "/v1/fine_tuning/jobs", "/v1/fusions"):
        assert backend(path) == "Service"


@pytest.mark.parametrize("deployment", [serving, trainer], ids=["serving", "trainer"])
def test_probes_hit_health_on_the_container_port(deployment):
    deployment = deployment()
    c = container(deployment)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        http_get = c[probe]["httpGet"]
        assert http_get["path"] == HEALTH, probe
        assert container_port(deployment, http_get["port"]) == PORT, probe
        assert http_get.get("scheme", "HTTP") == "HTTP", probe
    # Loading the model: the startup probe allows at least five minutes before a restart.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    # A draining pod (503) leaves the endpoints within seconds.
    readiness = c["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= 15


def _prestop_sleep_seconds(c: dict) -> float:
    hook = c["lifecycle"]["preStop"]
    if "sleep" in hook:
        return hook["sleep"]["seconds"]
    command = hook["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep") and len(command) == 2, command
    return float(command[1])


@pytest.mark.parametrize("deployment", [serving, trainer], ids=["serving", "trainer"])
def test_the_grace_period_outlasts_the_prestop_sleep_and_the_drain(deployment):
    from plait.server.fine_tuning.jobs import JobRunner
    from plait.server.serve import DRAIN_SECONDS

    deployment = deployment()
    sleep = _prestop_sleep_seconds(container(deployment))
    assert 2 <= sleep <= 15, "a few seconds for the endpoints to drop the pod before SIGTERM"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > sleep + DRAIN_SECONDS
    # and the time a server takes to stop a running trainer and hand its job back
    handback = inspect.signature(JobRunner.stop).parameters["timeout"].default
    assert grace >= sleep + DRAIN_SECONDS + handback


# --- scaling and disruption ----------------------------------------------------------------------


def _adapter_exposed_name(series: str) -> str:
    """The name the Prometheus Adapter gives `series`, by the rule in prometheus-adapter/values.yaml."""
    matching = []
    for rule in helm_values("prometheus-adapter")["rules"]["custom"]:
        selected = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"])
        if selected and selected.group(1) == series:
            pattern = re.compile(rule["name"]["matches"])
            assert pattern.search(series), "the rule's name.matches must match the series it queries"
            assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
            overrides = rule["resources"]["overrides"]
            assert overrides["pod"]["resource"] == "pod" and overrides["namespace"]["resource"] == "namespace"
            # The adapter replaces the match with `as` ($1-style groups become Python's \1).
            matching.append(pattern.sub(re.sub(r"\$\{?(\d+)\}?", r"\\\1", rule["name"]["as"]), series))
    assert len(matching) == 1, f"one adapter rule must expose {series}"
    return matching[0]


def test_the_autoscaler_scales_the_serving_deployment_on_queued_requests_per_pod():
    hpa = find("HorizontalPodAutoscaler", "plait")
    target = hpa["spec"]["scaleTargetRef"]
    deployment = serving()
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    assert "replicas" not in deployment["spec"], "the autoscaler owns the count; apply would reset it"

    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = _adapter_exposed_name("vllm:num_requests_waiting")
    assert ":" not in name
    assert metric["pods"]["metric"]["name"] == name
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert float(metric["pods"]["target"]["averageValue"]) > 0

    pdb = find("PodDisruptionBudget", "plait")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"], "a disruption must leave a pod serving"


def test_the_trainer_is_one_pod_that_is_replaced_not_surged():
    t = trainer()
    assert t["spec"]["replicas"] == 1
    assert t["spec"]["strategy"]["type"] == "Recreate", "a surge pod would need a second GPU"
    update = serving()["spec"]["strategy"]["rollingUpdate"]
    assert update["maxSurge"] == 0 and update["maxUnavailable"] == 1


# --- configuration: envFrom, flags, GPUs, the data dir -------------------------------------------


def _env_sources(deployment: dict) -> tuple[list[str], list[str]]:
    env_from = container(deployment)["envFrom"]
    config_maps = [e["configMapRef"]["name"] for e in env_from if "configMapRef" in e]
    secrets = [e["secretRef"]["name"] for e in env_from if "secretRef" in e]
    return config_maps, secrets


@pytest.mark.parametrize("deployment", [serving, trainer], ids=["serving", "trainer"])
def test_env_from_names_exist(deployment):
    config_maps, secrets = _env_sources(deployment())
    assert config_maps and secrets
    for name in config_maps:
        find("ConfigMap", name, applied_documents())
    for name in secrets:
        # Created by hand from the template (not applied by the kustomization): it must exist there.
        find("Secret", name, load_documents(MANIFESTS / "secret-template.yaml"))


def test_settings_and_secrets_are_apart():
    config = find("ConfigMap", "plait-config")["data"]
    secret = find("Secret", "plait-secrets")
    assert set(secret["stringData"]) == SECRET_KEYS
    assert not set(config) & set(secret["stringData"]), "a key in both: envFrom's later source silently wins"
    assert config["PLAIT_STORE"].startswith("s3://")
    assert "AWS_DEFAULT_REGION" in config
    assert secret["stringData"]["PLAIT_DATABASE"].startswith("postgresql://")
    for key, value in secret["stringData"].items():
        assert "REPLACE-ME" in value, f"{key}: the template must hold placeholders, never a real value"


def _entrypoint(dockerfile: Path) -> list[str]:
    (entrypoint,) = [
        json.loads(args) for keyword, args in dockerfile_instructions(dockerfile) if keyword == "ENTRYPOINT"
    ]
    return entrypoint


def _expanded_args(deployment: dict) -> list[str]:
    """The container's args as the kubelet passes them: $(VAR) from the container's environment."""
    config = {}
    for name in _env_sources(deployment)[0]:
        config.update(find("ConfigMap", name)["data"])
    args = []
    for arg in container(deployment)["args"]:
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
            # Only from the ConfigMap: a secret substituted into args would show in `ps` and the pod spec.
            assert var in config, f"$({var}) is not a ConfigMap key: the flag would get the literal text"
        args.append(re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: config[m.group(1)], arg))
    return args


@pytest.mark.parametrize(("deployment", "trains"), [(serving, False), (trainer, True)], ids=["serving", "trainer"])
def test_plait_serve_accepts_the_image_entrypoint_and_the_args(deployment, trains):
    import argparse

    from plait.server.serve import add_arguments

    deployment = deployment()
    entrypoint = _entrypoint(DEPLOY / "Dockerfile.cuda")
    assert Path(entrypoint[0]).name == "plait" and entrypoint[1] == "serve"
    parser = argparse.ArgumentParser(prog="plait serve", exit_on_error=False)
    add_arguments(parser)
    args = parser.parse_args(entrypoint[2:] + _expanded_args(deployment))

    assert args.host == "0.0.0.0"
    assert args.port == container_port(deployment, "http")
    assert args.train is trains
    # --data-dir is on the pod's emptyDir volume.
    mounts = {m["mountPath"]: m["name"] for m in container(deployment)["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert args.data_dir in mounts, "--data-dir is not a mounted volume"
    assert "emptyDir" in volumes[mounts[args.data_dir]]


@pytest.mark.parametrize("deployment", [serving, trainer], ids=["serving", "trainer"])
def test_each_pod_gets_one_gpu_and_runs_as_the_images_user(deployment):
    deployment = deployment()
    resources = container(deployment)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert "cpu" in resources["requests"] and "memory" in resources["requests"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (user,) = [args for keyword, args in dockerfile_instructions(DEPLOY / "Dockerfile.cuda") if keyword == "USER"]
    assert user.split(":")[0] == str(pod["securityContext"]["runAsUser"]) != "0"
    assert container(deployment)["securityContext"]["allowPrivilegeEscalation"] is False


# --- the endpoint picker's values ----------------------------------------------------------------


def test_the_endpoint_picker_scores_lora_affinity_from_the_pods_metrics():
    values = helm_values("epp")
    assert values["inferencePool"]["modelServerType"] == "vllm", "Plait serves vLLM's metric names"
    extension = values["inferenceExtension"]
    config = yaml.safe_load(extension["pluginsCustomConfig"][extension["pluginsConfigFile"]])
    assert (config["apiVersion"], config["kind"]) == ("inference.networking.x-k8s.io/v1alpha1", "EndpointPickerConfig")
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    for profile in config["schedulingProfiles"]:
        for ref in profile["plugins"]:
            assert ref["pluginRef"] in plugins, f"{ref['pluginRef']} is not defined"
    (default,) = [p for p in config["schedulingProfiles"] if p["name"] == "default"]
    scorers = {ref["pluginRef"] for ref in default["plugins"]}
    assert {"lora-affinity-scorer", "queue-scorer", "kv-cache-utilization-scorer"} <= scorers
    assert plugins["metrics-data-source"]["parameters"]["path"] == "/metrics"


def test_the_readme_pins_the_versions_that_are_vendored():
    readme = (DEPLOY / "README.md").read_text()
    for name in CRD_FILES.values():
        crd = yaml.safe_load((CRDS / name).read_text())
        (version,) = [v for k, v in crd["metadata"]["annotations"].items() if k.endswith("/bundle-version")]
        assert version in readme, f"deploy/README.md does not name {name}'s release {version}"
    crd = yaml.safe_load((CRDS / CRD_FILES["inference.networking.k8s.io", "InferencePool"]).read_text())
    version = crd["metadata"]["annotations"]["inference.networking.k8s.io/bundle-version"]
    assert f"charts/inferencepool --version {version}" in " ".join(readme.split())
    assert f"epp:{version}" in (MANIFESTS / "epp" / "values.yaml").read_text()


# --- the CUDA image ------------------------------------------------------------------------------


def test_the_cuda_image_installs_cuda_torch_before_make_install_and_serves_like_the_cpu_one():
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile.cuda")
    keywords = [k for k, _ in instructions]
    base = [args for k, args in instructions if k == "FROM"]
    arg_defaults = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for k, a in instructions if k == "ARG")))
    assert arg_defaults["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime-ubuntu" in arg_defaults["CUDA_IMAGE"]
    assert base == ["${CUDA_IMAGE}"]

    runs = [args for k, args in instructions if k == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if '"${TORCH}"' in r)
    make_step = next(i for i, r in enumerate(runs) if "make install" in r)
    assert torch_step < make_step, "the Makefile keeps an installed torch only if it is there first"
    assert "python3.11" in runs[0] and "torch.version.cuda" in runs[torch_step]
    assert "resolve_model(None)" in runs[make_step], "the embedded model is converted at build time"

    assert keywords.index("USER") > make_step and keywords.index("USER") < keywords.index("ENTRYPOINT")
    (exposed,) = [args for k, args in instructions if k == "EXPOSE"]
    assert exposed == str(PORT)
    (healthcheck,) = [args for k, args in instructions if k == "HEALTHCHECK"]
    assert f"127.0.0.1:{PORT}{HEALTH}" in healthcheck

    cuda, cpu = _entrypoint(DEPLOY / "Dockerfile.cuda"), _entrypoint(DEPLOY / "Dockerfile")
    assert Path(cuda[0]).name == Path(cpu[0]).name and cuda[1:] == cpu[1:]
    assert cuda[1:] == shlex.split(f"serve --host 0.0.0.0 --port {PORT}")
