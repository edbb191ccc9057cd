"""Schema fuzzing: schemathesis generates requests for every route of the server's own OpenAPI
document, valid ones and invalid ones, and the server must never answer with a 5xx, nor with a
status the document does not list for that route.

Bounded: a fixed number of examples per route and kind, generation capped at a few tokens, and a
server without keys, so every route is reached. The server is real (`plait serve` on loopback).
Every route is fuzzed even when one fails, and the failures are reported together."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

MAX_NEW_TOKENS = 4
EXAMPLES = 40  # per route, for valid and for invalid requests each


@pytest.fixture(scope="module")
def fuzzed_server(launch_module_server):
    return launch_module_server("--default-max-tokens", str(MAX_NEW_TOKENS), "--max-model-len", "512")


def _short(case) -> None:
    """Keep generation short: the point is the request, not the answer."""
    if isinstance(case.body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(key), int) and case.body[key] > MAX_NEW_TOKENS:
                case.body[key] = MAX_NEW_TOKENS


def test_no_route_answers_a_5xx_or_an_undocumented_status(fuzzed_server):
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25, [op.label for op in operations]
    failures: dict[str, str] = {}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
            def call(case):
                _short(case)
                case.call_and_validate(checks=[not_a_server_error, status_code_conformance], timeout=120)

            try:
                call()
            except Unsatisfiable:  # no invalid request exists for a route without inputs
                assert mode is GenerationMode.NEGATIVE, operation.label
            except Exception as exc:  # one route's failure must not hide another's
                failures[f"{operation.label} ({mode.value})"] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{label}:\n{why}" for label, why in failures.items())
