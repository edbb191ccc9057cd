"""The contract between the server's fine-tuning jobs and `plait train`, tested once for both sides:
the data formats and line checks, line numbering, the trainer's command line as the server
builds it, the event lines, and the steps-per-epoch rule."""

from __future__ import annotations

import argparse
import json

import pytest

from plait.server.errors import ClientError
from plait.server.fine_tuning import contract
from plait.server.fine_tuning.files import check_training_file
from plait.trainer.batching import plan_steps
from plait.trainer.cli import add_arguments, resolve_config
from plait.trainer.data import DataError, read_examples, read_pairs

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}

ACCEPTED = [
    CHAT,
    {"messages": [{"role": "system", "content": "Be brief."}, *CHAT["messages"]]},
    {
        "messages": [
            *CHAT["messages"],
            {"role": "user", "content": "More"},
            {"role": "assistant", "content": "No.", "weight": 0},
        ]
    },
    {"messages": [{"role": "user", "content": "q", "name": "ann"}, {"role": "assistant", "content": "a", "weight": 1}]},
    {"prompt": "q", "completion": "a"},
    {"prompt": "", "completion": "a"},
    {"instruction": "i", "output": "o"},
    {"instruction": "i", "input": "x", "output": "o"},
]

REFUSED = [
    ({"messages": []}, '"messages" is empty'),
    ({"messages": "hi"}, '"messages" must be a list'),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
        "nothing to train on",
    ),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "content is empty"),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]},
        "weight must be 0 or 1",
    ),
    (
        {"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]},
        "weight must be 0 or 1",
    ),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": True}]},
        "weight must be 0 or 1",
    ),
    ({"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]}, "must be a string"),
    (
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": []}]},
        "unknown key tool_calls",
    ),
    ({"messages": [{"role": "function", "content": "q"}, {"role": "assistant", "content": "a"}]}, "tool and function"),
    ({**CHAT, "tools": []}, "tool and function definitions"),
    ({"messages": [{"role": "user", "content": "q"}, "a"]}, "message 2 must be an object"),
    ({"prompt": "q"}, "missing completion"),
    ({"prompt": "q", "completion": " "}, '"completion" is empty'),
    ({"prompt": "q", "completion": "a", "extra": 1}, "unknown key extra"),
    ({"prompt": None, "completion": "a"}, '"prompt" must be a string'),
    ({"instruction": "i", "input": 3, "output": "o"}, '"input" must be a string'),
    ({"output": "o"}, "missing instruction"),
    ({"text": "plain"}, "unknown format (keys: text)"),
    ({}, "unknown format (keys: none)"),
    ([1], "expected a JSON object, got a list"),
    ("text", "expected a JSON object, got a string"),
    (3, "expected a JSON object, got a number"),
]


@pytest.mark.parametrize("record", ACCEPTED, ids=range(len(ACCEPTED)))
def test_examples_in_each_format_are_read(record):
    conversation = contract.parse_example(json.dumps(record))
    assert conversation[-1].role == "assistant" and any(m.trained for m in conversation)


@pytest.mark.parametrize(("record", "reason"), REFUSED, ids=range(len(REFUSED)))
def test_bad_examples_are_refused_saying_why(record, reason):
    with pytest.raises(ValueError) as refused:
        contract.parse_example(json.dumps(record))
    assert reason in str(refused.value)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{oops}", "invalid JSON"),
        (b"{} {}", "invalid JSON"),
        (b"\xff", "not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_lines_that_are_not_json_are_problems_not_crashes(raw, reason, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(CHAT).encode() + b"\n" + raw + b"\n")
    with open(path, "rb") as f:
        parsed = list(contract.parse_lines(f))
    assert [n for n, _ in parsed] == [1, 2]
    assert isinstance(parsed[1][1], ValueError) and reason in str(parsed[1][1])
    with pytest.raises(DataError):
        read_examples(path)
    with pytest.raises(ClientError) as server:
        check_training_file(path)
    assert "line 2: " in server.value.message and reason in server.value.message


def test_lines_are_numbered_alike_by_the_server_and_the_trainer(tmp_path):
    """Blank lines, CRLF, a lone CR and a byte-order mark: both sides read the file through `parse_lines`."""
    good, bad = json.dumps(CHAT).encode(), b"{bad"
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\r\n\r\n" + bad + b"\r" + good + b"\n\n" + bad + b"\n" + good)
    with pytest.raises(DataError) as trainer:
        read_examples(path)
    with pytest.raises(ClientError) as server:
        check_training_file(path)
    numbers = [p.split(":")[0] for p in trainer.value.problems]
    assert numbers == ["line 3", "line 6"]
    assert all(f"{n}: invalid JSON" in server.value.message for n in numbers)
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\r\n\r\n" + good + b"\r" + good + b"\n")
    assert check_training_file(path) == (len(read_examples(path)), "chat") == (3, "chat")
    pair = json.dumps(GOOD_PAIRS[1]).encode()
    path.write_bytes(b"\xef\xbb\xbf" + pair + b"\r\n\r\n" + pair + b"\n")
    assert check_training_file(path) == (len(read_pairs(path)), "preference") == (2, "preference")


def test_the_command_line_the_server_builds_is_the_one_the_trainer_reads(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(CHAT) + "\n")
    run = contract.TrainerRun(
        data=str(data),
        model="/models/base",
        epochs=3,
        batch_size=2,
        grad_accum=4,
        lr=3e-4,
        lora_r=8,
        lora_alpha=16.0,
        lora_dropout=0.1,
        seed=7,
        save_every=5,
        dtype="float32",
        eval_file=str(data),
        threads=1,
    )
    command = run.command("python")
    assert command[:5] == ["python", "-m", "plait.cli", "train", str(data)]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = resolve_config(parser.parse_args(command[4:]))
    expected = {
        "data": str(data),
        "output": contract.ADAPTER_DIR,
        "events": contract.EVENTS_FILE,
        "model": "/models/base",
        "epochs": 3,
        "batch_size": 2,
        "grad_accum": 4,
        "lr": 3e-4,
        "lora_r": 8,
        "lora_alpha": 16.0,
        "lora_dropout": 0.1,
        "seed": 7,
        "save_every": 5,
        "dtype": "float32",
        "eval_file": str(data),
        "threads": 1,
        "device": None,
    }
    assert {key: getattr(config, key) for key in expected} == expected


def test_events_go_through_the_file_whole(tmp_path):
    path = tmp_path / contract.EVENTS_FILE
    writer, reader = contract.EventWriter(path), contract.EventReader(path)
    sent = [
        contract.StartEvent(total_steps=4, examples=10),
        contract.StepEvent(step=1, total_steps=4, train_loss=2.5, learning_rate=1e-4, tokens=300, epochs=0.25),
        contract.EvalEvent(step=1, eval_loss=2.25, metrics={"rewards/margins": 0.5, "rewards/accuracies": 1.0}),
        contract.CheckpointEvent(step=2, path="run/checkpoints/step-2", train_loss=2.0),
    ]
    for event in sent[:2]:
        writer.write(event)
    assert reader.read() == sent[:2]
    for event in sent[2:]:
        writer.write(event)
    with open(path, "a") as f:  # what a reader may see while a line is being written, and a stranger's line
        f.write(json.dumps({"type": "telemetry", "x": 1}) + "\n" + '{"type": "step", "ste')
    assert reader.read() == sent[2:]
    with open(path, "a") as f:
        f.write('p": 2}\n')  # finished, but not a whole step event
    writer.write(contract.DoneEvent("adapter", steps=4, tokens=1200, final_train_loss=1.5))
    assert reader.read() == [contract.DoneEvent("adapter", steps=4, tokens=1200, final_train_loss=1.5)]
    writer.close()


@pytest.mark.parametrize(("examples", "batch_size", "grad_accum"), [(1, 1, 1), (10, 4, 1), (10, 3, 2), (9, 2, 8)])
def test_steps_per_epoch_is_the_trainers_plan(examples, batch_size, grad_accum):
    plan = plan_steps(examples, batch_size, grad_accum, epochs=2, max_steps=None, seed=0)
    per_epoch = contract.steps_per_epoch(examples, batch_size, grad_accum)
    assert len(plan) == 2 * per_epoch
    assert [step.epoch for step in plan] == [0] * per_epoch + [1] * per_epoch


GOOD_PAIRS = [
    {
        "input": {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]},
        "preferred_output": [{"role": "assistant", "content": "Hello!"}],
        "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
    },
    {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
    {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    },
]


@pytest.mark.parametrize("record", GOOD_PAIRS)
def test_preference_pairs_in_openais_and_trls_format_are_read(record):
    pair = contract.parse_preference(json.dumps(record))
    assert (pair.prompt[-1], pair.preferred, pair.non_preferred) == (
        contract.Message("user", "Hi"),
        "Hello!",
        "Go away.",
    )
    chosen, rejected = pair.conversations()
    assert chosen[:-1] == rejected[:-1] == pair.prompt and not any(m.trained for m in pair.prompt)
    assert chosen[-1] == contract.Message("assistant", "Hello!", trained=True)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({**GOOD_PAIRS[0], "non_preferred_output": GOOD_PAIRS[0]["preferred_output"]}, "are identical"),
        ({"prompt": "Hi", "chosen": "Same", "rejected": "Same"}, "chosen and rejected are identical"),
        (
            {"input": GOOD_PAIRS[0]["input"], "preferred_output": [{"role": "assistant", "content": "a"}]},
            "missing non_preferred_output",
        ),
        ({"prompt": "Hi", "chosen": "a"}, "missing rejected"),
        ({**GOOD_PAIRS[1], "extra": 1}, "unknown key extra"),
        (
            {**GOOD_PAIRS[0], "input": {"messages": [{"role": "assistant", "content": "x"}]}},
            "must end with a user message",
        ),
        ({**GOOD_PAIRS[0], "input": {"messages": []}}, "non-empty list"),
        ({**GOOD_PAIRS[0], "input": {**GOOD_PAIRS[0]["input"], "tools": []}}, "tool and function definitions"),
        ({**GOOD_PAIRS[0], "preferred_output": [{"role": "user", "content": "x"}]}, "must hold an assistant message"),
        ({**GOOD_PAIRS[0], "preferred_output": []}, "a list of one assistant message"),
        ({**GOOD_PAIRS[1], "chosen": "  "}, '"chosen" is empty'),
        ({"messages": [{"role": "user", "content": "x"}]}, "unknown preference format"),
    ],
)
def test_bad_preference_pairs_are_refused_saying_why(record, reason):
    with pytest.raises(ValueError, match=reason):
        contract.parse_preference(json.dumps(record))


def test_a_dpo_run_from_an_adapter_reaches_the_trainer_whole(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(GOOD_PAIRS[0]) + "\n")
    (tmp_path / "start").mkdir()
    (tmp_path / "start" / "adapter_config.json").write_text("{}")
    run = contract.TrainerRun(
        data=str(data),
        model="/models/base",
        epochs=1,
        batch_size=1,
        grad_accum=1,
        lr=1e-5,
        lora_r=None,
        lora_alpha=None,
        lora_dropout=None,
        seed=1,
        save_every=1,
        dtype="float32",
        method="dpo",
        beta=0.25,
        init_adapter=str(tmp_path / "start"),
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = resolve_config(parser.parse_args(run.command("python")[4:]))
    assert (config.method, config.beta, config.init_adapter) == ("dpo", 0.25, str(tmp_path / "start"))
    assert "--lora-r" not in run.command("python")  # the adapter keeps its own; the trainer refuses both
