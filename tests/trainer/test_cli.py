"""plait train's command line: config files and flag precedence, one-line errors, the publish client."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import httpx
import pytest

from plait.trainer.cli import add_arguments, resolve_config
from plait.trainer.config import ConfigError, TrainConfig
from plait.trainer.publish import PublishError, publish


def _parse(*argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return resolve_config(parser.parse_args(argv))


# --- config file and flags -----------------------------------------------------------------

TOML = """
data = "train.jsonl"
output = "out"
lr = 1e-4
epochs = 2
lora-r = 8
lora_alpha = 16
target-modules = ["q_proj", "v_proj"]
use-rslora = true
validation-file = "val.jsonl"
"""

YAML = """
data: train.jsonl
output: out
lr: 0.0001
epochs: 2
lora-r: 8
lora_alpha: 16
target-modules: q_proj, v_proj
use-rslora: true
validation-file: val.jsonl
"""


@pytest.mark.parametrize(("name", "text"), [("c.toml", TOML), ("c.yaml", YAML)])
def test_config_file_holds_flags_and_flags_override_it(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    config = _parse("--config", str(path))
    assert (config.data, config.output, config.lr, config.epochs) == ("train.jsonl", "out", 1e-4, 2)
    assert (config.lora_r, config.lora_alpha, config.use_rslora) == (8, 16.0, True)
    assert config.target_modules == ("q_proj", "v_proj")
    assert config.eval_file == "val.jsonl"
    assert config.batch_size == TrainConfig.batch_size  # neither file nor flag: the default

    over = _parse("other.jsonl", "--config", str(path), "--lr", "3e-4", "--no-use-rslora", "--target-modules", "o_proj")
    assert (over.data, over.lr, over.use_rslora, over.target_modules) == ("other.jsonl", 3e-4, False, ("o_proj",))
    assert over.epochs == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr = 1e-4\nlearning_rate = 2\nepoch = 3\n", "unknown setting learning_rate, epoch"),
        ("epochs = 1.5\n", "epochs must be an integer, got 1.5"),
        ('use-rslora = "yes"\n', "use-rslora must be true or false"),
        ("batch-size = true\n", "batch-size must be an integer, got True"),
        ("target-modules = []\n", "target-modules must be a list of module names"),
        ("lr = [1\n", "is not valid TOML"),
    ],
)
def test_bad_config_files_are_refused_by_name(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        _parse("d.jsonl", "-o", "out", "--config", str(path))


def test_admin_key_comes_from_the_environment_unless_given(monkeypatch):
    monkeypatch.setenv("PLAIT_ADMIN_KEY", "from-env")
    assert _parse("d.jsonl", "-o", "out").admin_key == "from-env"
    assert _parse("d.jsonl", "-o", "out", "--admin-key", "flag").admin_key == "flag"
    assert "from-env" not in json.dumps(_parse("d.jsonl", "-o", "out").public())


# --- one-line errors -----------------------------------------------------------------------


def _train(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "plait.cli", "train", *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stdout + result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("plait train: error:")]


GOOD = '{"prompt": "q", "completion": "a"}\n'


@pytest.mark.parametrize(
    ("files", "args", "expected"),
    [
        ({}, ["-o", "out"], "no training data"),
        ({"d.jsonl": GOOD}, ["d.jsonl"], "no output folder"),
        ({"d.jsonl": GOOD}, ["d.jsonl", "-o", "out", "--epochs", "0"], "--epochs must be at least 1"),
        ({"d.jsonl": GOOD}, ["d.jsonl", "-o", "out", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
        ({}, ["missing.jsonl", "-o", "out"], "missing.jsonl: cannot be read"),
        ({"d.jsonl": GOOD, "out/x": ""}, ["d.jsonl", "-o", "out"], "already exists"),
        ({"d.jsonl": GOOD}, ["d.jsonl", "-o", "out", "--resume"], "--resume: no checkpoint in"),
        (
            {"d.jsonl": GOOD, "c.toml": "bogus = 1\n"},
            ["d.jsonl", "-o", "out", "--config", "c.toml"],
            "unknown setting bogus",
        ),
        (
            {"d.jsonl": GOOD, "e.jsonl": "{}\n"},
            ["d.jsonl", "-o", "out", "--eval-file", "e.jsonl"],
            "e.jsonl: line 1: unknown format",
        ),
        ({"d.jsonl": GOOD}, ["d.jsonl", "-o", "out", "--model", "nowhere"], "model folder not found"),
        (
            {"d.jsonl": GOOD, "out.partial/checkpoints/step-00000002/trainer_state.json": "{}"},
            ["d.jsonl", "-o", "out"],
            "holds checkpoints of an interrupted run: add --resume",
        ),
    ],
)
def test_errors_are_one_line_with_status_2(tmp_path, files, args, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    result = _train(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    [line] = _error_lines(result)
    assert expected in line


def test_bad_data_lists_every_bad_line_before_loading_anything(tmp_path):
    (tmp_path / "d.jsonl").write_text(GOOD + "{oops\n" + GOOD + '{"messages": []}\n' + "\n" + '{"prompt": 1}\n')
    result = _train(tmp_path, "d.jsonl", "-o", "out")
    assert result.returncode == 2
    [line] = _error_lines(result)
    assert line.endswith("d.jsonl: 3 problems")
    details = [d.strip() for d in result.stderr.splitlines() if d.startswith("  ")]
    assert [d.split(":")[0] for d in details] == ["line 2", "line 4", "line 6"]
    assert "loading" not in result.stderr and not (tmp_path / "out.partial").exists()


def test_a_bad_flag_value_is_argparse_one_liner(tmp_path):
    result = _train(tmp_path, "d.jsonl", "--lr", "fast")
    assert result.returncode == 2
    assert _error_lines(result) == ["plait train: error: argument --lr: invalid float value: 'fast'"]


def test_help_lists_the_training_flags(tmp_path):
    out = _train(tmp_path, "--help").stdout
    for flag in (
        "--config",
        "--lora-r",
        "--target-modules",
        "--use-rslora",
        "--grad-accum",
        "--resume",
        "--publish",
        "--validation-file",
        "--max-seq-len",
        "--seed",
        "--warmup-steps",
        "--save-every",
        "--admin-key",
    ):
        assert flag in out


# --- publish -------------------------------------------------------------------------------


@pytest.fixture
def adapter(tmp_path):
    folder = tmp_path / "my-adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"\x00weights\xff")
    (folder / "training_report.json").write_text("{}")
    return folder


def test_publish_posts_the_two_files_as_multipart(adapter):
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["url"], seen["auth"] = str(request.url), request.headers.get("authorization")
        seen["body"] = request.read()
        seen["type"] = request.headers["content-type"]
        return httpx.Response(201, json={"id": "my-adapter", "object": "adapter"})

    reply = publish("http://plait.test:8000/", "my-adapter", adapter, "s3cret", transport=httpx.MockTransport(handler))
    assert reply == {"id": "my-adapter", "object": "adapter"}
    assert seen["url"] == "http://plait.test:8000/v1/adapters"
    assert seen["auth"] == "Bearer s3cret"
    assert seen["type"].startswith("multipart/form-data")
    body = seen["body"]
    assert b'name="id"\r\n\r\nmy-adapter\r\n' in body
    assert b'name="files"; filename="adapter_config.json"' in body and b'{"r": 8}' in body
    assert b'name="files"; filename="adapter_model.safetensors"' in body and b"\x00weights\xff" in body
    assert b"training_report.json" not in body


def test_publish_accepts_a_url_ending_in_v1_and_no_key(adapter):
    def handler(request: httpx.Request) -> httpx.Response:
        assert str(request.url) == "http://h/v1/adapters" and "authorization" not in request.headers
        return httpx.Response(200, json={})

    publish("http://h/v1", "x", adapter, None, transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (
            httpx.Response(401, json={"error": {"message": "invalid admin key", "type": "auth"}}),
            "401: invalid admin key",
        ),
        (httpx.Response(422, json={"error": {"message": "rank 4096\nis too large"}}), "422: rank 4096 is too large"),
        (httpx.Response(502, text="Bad gateway"), "502: Bad gateway"),
    ],
)
def test_publish_errors_carry_the_servers_message(adapter, response, message):
    with pytest.raises(PublishError, match=message):
        publish("http://h", "x", adapter, "k", transport=httpx.MockTransport(lambda request: response))


def test_publish_to_nothing_is_a_publish_error(adapter):
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(PublishError, match="cannot reach http://h/v1: connection refused"):
        publish("http://h", "x", adapter, "k", transport=httpx.MockTransport(refuse))


def test_the_cpu_weights_choices_are_the_servers():
    from plait.server.base_model import CPU_WEIGHTS
    from plait.trainer import cli

    assert cli.CPU_WEIGHTS == CPU_WEIGHTS
