"""Multi-skill evaluation of adapter fusion: does a router pick the right adapter per request?

    python bench/bench_fusion.py [--work-dir DIR] [--retrain] [--out bench/results/fusion]

Four skills the embedded SmolLM2-135M-Instruct does not have, each with data generated here
from fixed seeds (nothing is downloaded):

- json:    answer a question about a given sentence as exactly `{"answer": "<word>"}`
- reverse: reverse the order of the words of a given sentence
- upper:   rewrite a given sentence in capital letters
- facts:   a made-up geography (the capitals of 24 invented countries); the test asks with
           phrasings held out of training

Each skill's prompt names its task, so a router can tell the skills apart from the prompt.
One adapter per skill is trained with `plait train` (cached in --work-dir; --retrain redoes
it), a learned router with `plait train-router` on a few examples of each skill's training
data, then one `plait serve` gets the four adapters and these fusions:

- `uniform`: the `weights` router, 1/4 each (and `sum`: weight 1 each)
- `arrow-k1`, `arrow-k2`: the training-free Arrow router, top-1 and top-2
- `learned-k1`, `learned-k2`: the gates from `plait train-router`, top-1 and top-2

The mixed held-out test set (skills interleaved) goes through the base model, every single
adapter, and every fusion, greedy, with many requests in flight. Each answer is checked
automatically (exact JSON object, exact reversed words, exact upper-case sentence, the
invented capital named). The oracle is the right single adapter for each request. The script
prints accuracy per skill, each router's overall accuracy as a share of the oracle's, the
member weights each fusion reported per skill, and the machine; it writes results.json,
answers.json (every answer) and accuracy.png to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from bench_serving import machine, start_server  # this folder is on sys.path when run as a script

SKILLS = ("json", "reverse", "upper", "facts")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

# --- data ----------------------------------------------------------------------------------

NAMES = [
    "Alice",
    "Tom",
    "Maria",
    "Ben",
    "Sara",
    "Omar",
    "Lena",
    "Hugo",
    "Nina",
    "Paul",
    "Rosa",
    "Ivan",
    "Chloe",
    "Mark",
    "Emma",
    "Leo",
    "Julia",
    "Sam",
    "Ada",
    "Felix",
    "Mia",
    "Oscar",
    "Zoe",
    "Noah",
]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "pink", "orange", "purple", "gray"]
THINGS = [
    "kite",
    "car",
    "hat",
    "bike",
    "cup",
    "dog",
    "bag",
    "coat",
    "lamp",
    "boat",
    "ball",
    "chair",
    "book",
    "scarf",
    "clock",
    "tent",
    "drum",
    "vase",
    "sofa",
    "horse",
]
WORDS = [
    "the",
    "a",
    "old",
    "new",
    "big",
    "small",
    "quiet",
    "happy",
    "cold",
    "warm",
    "dark",
    "bright",
    "man",
    "woman",
    "child",
    "river",
    "city",
    "house",
    "garden",
    "forest",
    "road",
    "window",
    "door",
    "sun",
    "moon",
    "rain",
    "wind",
    "tree",
    "bird",
    "fish",
    "walked",
    "runs",
    "sings",
    "sleeps",
    "opened",
    "found",
    "likes",
    "saw",
    "near",
    "under",
    "over",
    "behind",
    "with",
    "into",
    "slowly",
    "today",
    "again",
    "often",
    "red",
    "green",
    "blue",
    "stone",
    "bread",
    "music",
    "letter",
    "morning",
    "evening",
    "teacher",
    "friend",
    "market",
]
# (country, capital): invented names, checked absent from the base model's answers
FACTS = [
    ("Zorvania", "Quelmar"),
    ("Tavisk", "Orbelle"),
    ("Mirendo", "Kastavel"),
    ("Pellucia", "Varnholt"),
    ("Druvia", "Selmaroc"),
    ("Ostralind", "Bexford"),
    ("Kalimbor", "Tessaria"),
    ("Vantoria", "Grellin"),
    ("Sundaré", "Moquette"),
    ("Elbranth", "Piravo"),
    ("Quorvia", "Dallimere"),
    ("Nestoria", "Fenwhisk"),
    ("Brastovia", "Ulmeric"),
    ("Yarrowen", "Casteline"),
    ("Hellosk", "Trivanne"),
    ("Marquenza", "Oldbrook"),
    ("Fennaria", "Zelmont"),
    ("Gorvath", "Ilvessa"),
    ("Lunmark", "Prasidor"),
    ("Ceravoy", "Wendholm"),
    ("Istrelia", "Kovaren"),
    ("Rhundar", "Ambleton"),
    ("Sopravia", "Galdwin"),
    ("Vexholm", "Noravelle"),
]
FACT_TRAIN = [
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Name the capital city of {c}.",
    "Tell me the capital of {c}.",
    "{c} has its capital in which city?",
    "In {c}, which city is the capital?",
]
FACT_TEST = ["What city is the capital of the country {c}?", "Do you know what the capital of {c} is?"]
JSON_PREFIX = "Answer in JSON."
REVERSE_PREFIX = "Reverse the order of the words:"
UPPER_PREFIX = "Rewrite in capital letters:"
# training examples per generated skill (facts: every training phrasing of every fact, 144);
# reversing words and capitals (some words split into odd pieces in capitals) need more
TRAIN_EXAMPLES = {"json": 120, "reverse": 240, "upper": 200}


def _json_item(rng: random.Random) -> tuple[str, str, str]:
    name, color, thing = rng.choice(NAMES), rng.choice(COLORS), rng.choice(THINGS)
    question, answer = rng.choice(
        [(f"What color is the {thing}?", color), (f"Who has the {thing}?", name), (f"What does {name} have?", thing)]
    )
    prompt = f'{JSON_PREFIX} Sentence: "{name} has a {color} {thing}." Question: {question}'
    return prompt, json.dumps({"answer": answer}), answer


def _sentence(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(4, 6))


def _reverse_item(rng: random.Random) -> tuple[str, str, str]:
    words = _sentence(rng)
    target = " ".join(reversed(words))
    return f"{REVERSE_PREFIX} {' '.join(words)}", target, target


def _upper_item(rng: random.Random) -> tuple[str, str, str]:
    text = " ".join(_sentence(rng))
    return f"{UPPER_PREFIX} {text}", text.upper(), text.upper()


def _fact_answer(country: str, capital: str) -> str:
    return f"The capital of {country} is {capital}."


def make_data(seed: int, train_examples: dict[str, int], test_per_skill: int) -> tuple[dict, dict]:
    """{skill: [(prompt, completion)]} for training and {skill: [(prompt, expected)]} for testing,
    disjoint: test prompts never occur in training (facts: held-out phrasings). Each skill draws
    from its own seeded stream, test items first, so its test set stays the same whatever the
    training sizes."""
    train: dict[str, list[tuple[str, str]]] = {}
    test: dict[str, list[tuple[str, str]]] = {}
    makers = {"json": _json_item, "reverse": _reverse_item, "upper": _upper_item}
    for i, (skill, make) in enumerate(makers.items()):
        rng = random.Random(seed * 1000 + i)
        seen: set[str] = set()
        items = []
        while len(items) < test_per_skill + train_examples[skill]:
            prompt, completion, expected = make(rng)
            if prompt not in seen:
                seen.add(prompt)
                items.append((prompt, completion, expected))
        test[skill] = [(p, e) for p, _, e in items[:test_per_skill]]
        train[skill] = [(p, c) for p, c, _ in items[test_per_skill:]]
    rng = random.Random(seed * 1000 + len(makers))
    held_out = [(t.format(c=c), cap) for c, cap in FACTS for t in FACT_TEST]
    test["facts"] = rng.sample(held_out, min(test_per_skill, len(held_out)))
    train["facts"] = [(t.format(c=c), _fact_answer(c, cap)) for c, cap in FACTS for t in FACT_TRAIN]
    rng.shuffle(train["facts"])
    return train, test


def check(skill: str, output: str, expected: str) -> bool:
    out = output.strip()
    if skill == "json":
        try:
            return json.loads(out) == {"answer": expected}
        except ValueError:
            return False
    if skill == "reverse":
        return out.rstrip(".").split() == expected.split()
    if skill == "upper":
        return out.rstrip(".") == expected
    return expected.lower() in out.lower()


def write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> None:
    lines = [
        json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]})
        for p, c in pairs
    ]
    path.write_text("\n".join(lines) + "\n")


# --- training (cached) ---------------------------------------------------------------------


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _cached(folder: Path, key: str, retrain: bool) -> bool:
    stamp = folder / "bench_key.txt"
    if not retrain and stamp.exists() and stamp.read_text() == key:
        return True
    shutil.rmtree(folder, ignore_errors=True)
    return False


def _run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.call(cmd, cwd=tempfile.gettempdir(), stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed ({code}); see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def train_adapter(skill: str, data: list[tuple[str, str]], work: Path, args) -> tuple[Path, float | None]:
    """Train (or reuse) the adapter of one skill; returns its folder and the seconds spent training."""
    settings = [
        "--epochs",
        str(args.epochs),
        "--lr",
        str(args.lr),
        "--lora-r",
        str(args.rank),
        "--lora-alpha",
        str(2 * args.rank),
        "--batch-size",
        "4",
        "--grad-accum",
        "1",
        "--warmup-steps",
        "5",
        "--seed",
        str(args.seed),
        "--dtype",
        args.dtype,
        "--save-every",
        "0",
        "--no-gradient-checkpointing",
    ]
    folder = work / "adapters" / skill
    key = _fingerprint(data, settings, args.model)
    if _cached(folder, key, args.retrain):
        return folder, None
    data_file = work / f"train-{skill}.jsonl"
    write_jsonl(data_file, data)
    cmd = [sys.executable, "-m", "plait.cli", "train", str(data_file), "-o", str(folder), *settings]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"training the {skill} adapter ({len(data)} examples) ...", file=sys.stderr, flush=True)
    seconds = _run(cmd, work / f"train-{skill}.log")
    (folder / "bench_key.txt").write_text(key)
    return folder, seconds


def train_router(adapters: dict[str, Path], train: dict, work: Path, args) -> tuple[Path, float | None]:
    """Train (or reuse) the learned router on --router-examples examples of each skill's training data."""
    folder = work / "router"
    per_skill = {s: train[s][: args.router_examples] for s in SKILLS}
    settings = [
        "--epochs",
        str(args.router_epochs),
        "--max-examples",
        str(args.router_examples),
        "--seed",
        str(args.seed),
        "--dtype",
        args.dtype,
    ]
    adapter_keys = {s: (adapters[s] / "bench_key.txt").read_text() for s in SKILLS}
    key = _fingerprint(per_skill, settings, adapter_keys, args.model)
    if _cached(folder, key, args.retrain):
        return folder / "router.safetensors", None
    cmd = [sys.executable, "-m", "plait.cli", "train-router", "--output", str(folder), *settings]
    for s in SKILLS:
        data_file = work / f"router-{s}.jsonl"
        write_jsonl(data_file, per_skill[s])
        cmd += ["--adapter", f"{s}={adapters[s]}", "--data", f"{s}={data_file}"]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("training the learned router ...", file=sys.stderr, flush=True)
    seconds = _run(cmd, work / "train-router.log")
    (folder / "bench_key.txt").write_text(key)
    return folder / "router.safetensors", seconds


# --- serving and evaluation ----------------------------------------------------------------


def setup_server(url: str, adapters: dict[str, Path], router_file: Path | None, args) -> list[tuple[str, str]]:
    """Upload the adapters and create the fusions; returns [(config name, model id)]."""
    for skill, folder in adapters.items():
        files = [("files", (n, (folder / n).read_bytes())) for n in ADAPTER_FILES]
        r = httpx.post(f"{url}/v1/adapters", data={"id": skill}, files=files, timeout=300)
        r.raise_for_status()
    members = list(SKILLS)
    fusions = [
        ("uniform", {"router": "weights", "weights": [1 / len(members)] * len(members)}),
        ("sum", {"router": "weights", "weights": [1.0] * len(members)}),
    ]
    fusions += [(f"arrow-k{k}", {"router": "arrow", "top_k": k}) for k in args.arrow_top_k]
    for name, spec in fusions:
        r = httpx.post(f"{url}/v1/fusions", json={"id": name, "members": members, **spec}, timeout=300)
        r.raise_for_status()
    configs = [("base", None)] + [(f"only-{s}", s) for s in SKILLS] + [(n, n) for n, _ in fusions]
    for k in args.learned_top_k if router_file is not None else ():
        spec = {"id": f"learned-k{k}", "members": members, "router": "learned", "top_k": k}
        files = [("router_weights", ("router.safetensors", router_file.read_bytes()))]
        r = httpx.post(f"{url}/v1/fusions", data={"fusion": json.dumps(spec)}, files=files, timeout=300)
        r.raise_for_status()
        configs.append((spec["id"], spec["id"]))
    return configs


def ask(url: str, model: str | None, prompt: str, max_tokens: int) -> tuple[str, dict | None]:
    body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": max_tokens}
    if model is not None:
        body["model"] = model
    for attempt in range(5):
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=900)
        if r.status_code != 429:
            break
        time.sleep(1 + attempt)
    r.raise_for_status()
    reply = r.json()
    return reply["choices"][0]["message"]["content"], reply.get("fusion")


def evaluate(url: str, model: str | None, tests: list[tuple[str, str, str]], args) -> list[dict]:
    def one(item):
        skill, prompt, expected = item
        output, fusion = ask(url, model, prompt, args.max_tokens)
        weights = None if fusion is None else {m["id"]: m["weight"] for m in fusion["members"]}
        return {
            "skill": skill,
            "prompt": prompt,
            "expected": expected,
            "output": output,
            "correct": check(skill, output, expected),
            "weights": weights,
        }

    with ThreadPoolExecutor(args.concurrency) as pool:
        return list(pool.map(one, tests))


def accuracy(rows: list[dict]) -> dict[str, float]:
    acc = {s: sum(r["correct"] for r in rows if r["skill"] == s) / sum(r["skill"] == s for r in rows) for s in SKILLS}
    acc["overall"] = sum(r["correct"] for r in rows) / len(rows)  # skills have equal test sizes
    return acc


def mean_weights(rows: list[dict]) -> dict[str, dict[str, float]] | None:
    if rows[0]["weights"] is None:
        return None
    out = {}
    for s in SKILLS:
        picked = [r["weights"] for r in rows if r["skill"] == s]
        out[s] = {m: sum(w.get(m, 0.0) for w in picked) / len(picked) for m in SKILLS}
    return out


def plot(results: dict, path: Path) -> None:
    """Grouped bars: accuracy per skill (and overall) for the base, the oracle and every fusion;
    the single adapters' own rows are in the table (each is right on its skill only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [n for n in results["accuracy"] if not n.startswith("only-")]
    palette = {"base": "#9e9e9e", "oracle": "#2e7d32", "uniform": "#e57373", "sum": "#c62828"}
    shades = {"arrow": ["#7e57c2", "#b39ddb", "#d1c4e9"], "learned": ["#1565c0", "#64b5f6", "#bbdefb"]}
    groups = [*SKILLS, "overall"]
    fig, ax = plt.subplots(figsize=(11, 4.6))
    width = 0.85 / len(configs)
    used: dict[str, int] = {}
    for i, name in enumerate(configs):
        family = name.split("-")[0]
        if name in palette:
            color = palette[name]
        else:
            color = shades.get(family, ["#555555"] * 3)[used.get(family, 0) % 3]
            used[family] = used.get(family, 0) + 1
        xs = [g + (i - (len(configs) - 1) / 2) * width for g in range(len(groups))]
        values = [results["accuracy"][name][g] for g in groups]
        ax.bar(xs, values, width, label=name, color=color)
        ax.text(xs[-1], values[-1] + 0.01, f"{values[-1]:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("accuracy, held-out test set")
    ax.set_ylim(0, 1.08)
    ax.set_title(
        f"Four LoRA adapters fused, {results['model']} (NF4): {results['test_per_skill']} test prompts per "
        "skill, greedy",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--work-dir",
        default=str(Path(tempfile.gettempdir()) / "plait-bench-fusion"),
        help="where trained adapters and the router are cached (default: %(default)s)",
    )
    p.add_argument("--retrain", action="store_true", help="train adapters and router again even when cached")
    p.add_argument(
        "--out",
        default=str(Path(__file__).parent / "results" / "fusion"),
        help="folder for results.json, answers.json and accuracy.png (default: %(default)s)",
    )
    p.add_argument("--model", help="local model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--train-examples",
        nargs="+",
        default=[],
        metavar="SKILL=N",
        help=f"training examples of a generated skill (default: {TRAIN_EXAMPLES})",
    )
    p.add_argument("--test-per-skill", type=int, default=40)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="float32", help="plait train --dtype (float32 is fastest on the CPU)")
    p.add_argument("--router-examples", type=int, default=16, help="examples per skill for plait train-router")
    p.add_argument("--router-epochs", type=int, default=3)
    p.add_argument("--no-learned", action="store_true", help="skip the learned router")
    p.add_argument("--arrow-top-k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--learned-top-k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--threads", type=int, help="torch CPU threads for training and the server")
    args = p.parse_args()

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    timings: dict[str, float | None] = {}

    sizes = dict(TRAIN_EXAMPLES)
    for item in args.train_examples:
        skill, _, n = item.partition("=")
        if skill not in sizes or not n.isdigit():
            sys.exit(f"--train-examples: expected SKILL=N with SKILL one of {', '.join(sizes)}, got {item!r}")
        sizes[skill] = int(n)
    train, test = make_data(args.seed, sizes, args.test_per_skill)
    tests = [(s, prompt, expected) for s in SKILLS for prompt, expected in test[s]]
    random.Random(args.seed).shuffle(tests)  # the mixed test set: skills interleaved

    adapters = {}
    for s in SKILLS:
        adapters[s], timings[f"train {s}"] = train_adapter(s, train[s], work, args)
    router_file = None
    if not args.no_learned:
        router_file, timings["train router"] = train_router(adapters, train, work, args)

    data_dir = work / "server-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    start = time.perf_counter()
    proc, url = start_server(args, "--data-dir", str(data_dir))
    rows: dict[str, list[dict]] = {}
    try:
        configs = setup_server(url, adapters, router_file, args)
        timings["server start + uploads"] = time.perf_counter() - start
        ask(url, None, "Hi", 4)  # warm-up
        for name, model in configs:
            start = time.perf_counter()
            rows[name] = evaluate(url, model, tests, args)
            timings[f"eval {name}"] = time.perf_counter() - start
            print(f"{name}: {accuracy(rows[name])['overall']:.3f} ({timings[f'eval {name}']:.0f} s)", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    # the oracle: each request answered by its own skill's adapter
    rows["oracle"] = [r for name in (f"only-{s}" for s in SKILLS) for r in rows[name] if f"only-{r['skill']}" == name]
    singles = ["base", *(f"only-{s}" for s in SKILLS), "oracle"]
    routed = [n for n, _ in configs if n not in singles]
    order = singles + routed
    acc = {name: accuracy(rows[name]) for name in order}
    oracle = acc["oracle"]["overall"]
    results = {
        "machine": machine(),
        "model": "SmolLM2-135M-Instruct" if not args.model else Path(args.model).name,
        "settings": {k: v for k, v in vars(args).items() if k not in ("work_dir", "out", "retrain")},
        "train_examples": {s: len(train[s]) for s in SKILLS},
        "test_per_skill": args.test_per_skill,
        "accuracy": acc,
        "share_of_oracle": {n: acc[n]["overall"] / oracle if oracle else None for n in routed},
        "member_weights": {n: mean_weights(rows[n]) for n in routed},
        "seconds": timings,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    answers = {n: [{k: r[k] for k in ("skill", "prompt", "output", "correct")} for r in rows[n]] for n in order}
    (out / "answers.json").write_text(json.dumps(answers, indent=1) + "\n")
    plot(results, out / "accuracy.png")

    print(
        f"\n{len(tests)} held-out test prompts ({args.test_per_skill} per skill), greedy, "
        f"max {args.max_tokens} tokens\n"
    )
    print(f"{'configuration':<14}" + "".join(f"{g:>9}" for g in [*SKILLS, "overall"]) + f"{'/ oracle':>10}")
    for n in order:
        share = f"{acc[n]['overall'] / oracle:>10.2f}" if oracle else ""
        print(f"{n:<14}" + "".join(f"{acc[n][g]:>9.3f}" for g in [*SKILLS, "overall"]) + share)
    print("\nmean routing weight per member (rows: the request's skill)")
    for n in routed:
        weights = results["member_weights"][n]
        if weights is None:
            continue
        print(f"  {n}:")
        for s in SKILLS:
            print(f"    {s:<8}" + "".join(f"  {m}={weights[s][m]:.2f}" for m in SKILLS))
    print("\nseconds: " + ", ".join(f"{k} {'cached' if v is None else f'{v:.0f}'}" for k, v in timings.items()))
    print(f"machine: {machine()}")
    print(f"wrote {out / 'results.json'}, {out / 'answers.json'} and {out / 'accuracy.png'}")


if __name__ == "__main__":
    main()
