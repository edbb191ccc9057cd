"""plait train end to end: real QLoRA runs on a tiny random Llama and on the embedded SmolLM2.

The tiny model (2 layers, width 64, SmolLM2's tokenizer) makes the exactness checks cheap:
resume equivalence, seed repeatability, PEFT round trip, the loss against transformers'.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plait.cli import main
from plait.server.base_model import load_nf4_model, load_tokenizer, prepare_cpu_weights, resolve_model
from plait.server.fine_tuning.contract import parse_example
from plait.trainer import loop
from plait.trainer.batching import collate
from plait.trainer.config import TrainConfig
from plait.trainer.masking import tokenize_conversation
from plait.trainer.model import LoraSettings, load_for_training, loss_sum, write_adapter

CPU = torch.device("cpu")
QUESTION, ANSWER = "What is the code word for {}?", "The code word for {} is plait-{}."
SUBJECTS = ["red", "blue", "green", "gold"]


def _write_data(path: Path, repeats: int) -> Path:
    lines = []
    for _ in range(repeats):
        for n, subject in enumerate(SUBJECTS):
            lines.append(
                {
                    "messages": [
                        {"role": "user", "content": QUESTION.format(subject)},
                        {"role": "assistant", "content": ANSWER.format(subject, n)},
                    ]
                }
            )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    _write_data(root / "train.jsonl", repeats=2)
    _write_data(root / "eval.jsonl", repeats=1)
    return root


@pytest.fixture(scope="module")
def tiny_model(workdir) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(resolve_model(None))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    folder = workdir / "tiny-llama"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _train(*argv: str) -> int:
    with pytest.raises(SystemExit) as exited:
        main(["train", *map(str, argv)])
    return exited.value.code


def _tiny_args(workdir: Path, tiny_model: Path, output: str, *extra: str) -> list[str]:
    return [
        workdir / "train.jsonl",
        "-o",
        workdir / output,
        "--model",
        tiny_model,
        "--eval-file",
        workdir / "eval.jsonl",
        "--max-steps",
        "4",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--save-every",
        "2",
        "--lr",
        "1e-2",
        "--lora-r",
        "4",
        "--lora-dropout",
        "0.1",
        *extra,
    ]


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _report(folder: Path) -> dict:
    return json.loads((folder / "training_report.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(workdir, tiny_model) -> Path:
    assert _train(*_tiny_args(workdir, tiny_model, "uninterrupted", "--events", workdir / "events.jsonl")) == 0
    return workdir / "uninterrupted"


def test_events_file_has_a_line_per_step_eval_and_checkpoint(workdir, uninterrupted):
    events = [json.loads(line) for line in (workdir / "events.jsonl").read_text().splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds == ["start", "step", "step", "checkpoint", "step", "step", "eval", "done"]
    assert events[0]["total_steps"] == 4 and events[0]["resumed_from_step"] is None
    report = _report(uninterrupted)
    assert [[e["step"], e["train_loss"]] for e in events if e["type"] == "step"] == report["train_loss"]
    assert [[e["step"], e["eval_loss"]] for e in events if e["type"] == "eval"] == report["eval_loss"]
    checkpoint = events[3]
    assert checkpoint["step"] == 2 and checkpoint["path"].endswith("checkpoints/step-00000002")
    assert events[-1]["adapter"] == str(uninterrupted) and events[-1]["tokens"] == report["tokens"]
    assert all(isinstance(e["time"], float) for e in events)


def test_resume_gives_exactly_the_uninterrupted_result(
    workdir, tiny_model, uninterrupted, interrupt_after_checkpoint, capsys
):
    interrupt_after_checkpoint(_train, *_tiny_args(workdir, tiny_model, "resumed"))
    output, run_dir = workdir / "resumed", workdir / "resumed.partial"
    assert not output.exists()  # a failed run leaves no adapter where one would be looked for
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000002"]

    capsys.readouterr()
    assert _train(*_tiny_args(workdir, tiny_model, "resumed", "--lr", "5e-3", "--seed", "1", "--resume")) == 2
    assert "step-00000002 was made with different lr, seed" in capsys.readouterr().err
    assert _train(*_tiny_args(workdir, tiny_model, "resumed", "--resume")) == 0

    expected, got = _adapter(uninterrupted), _adapter(output)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    report, reference = _report(output), _report(uninterrupted)
    assert report["resumed_from_step"] == 2
    assert report["train_loss"] == reference["train_loss"] and report["eval_loss"] == reference["eval_loss"]
    assert report["tokens"] == reference["tokens"] and report["steps"] == 4
    assert not run_dir.exists() and not (output / "checkpoints").exists()


def test_an_unknown_target_module_is_a_one_line_error(workdir, tiny_model, capsys):
    assert _train(*_tiny_args(workdir, tiny_model, "no-such-module", "--target-modules", "q_proj,qkv_fused")) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert line == "plait train: error: --target-modules: tiny-llama has no module named 'qkv_fused'"
    assert not (workdir / "no-such-module").exists()


def test_the_seed_makes_a_run_repeatable(workdir, tiny_model, uninterrupted):
    assert _train(*_tiny_args(workdir, tiny_model, "again")) == 0
    assert _train(*_tiny_args(workdir, tiny_model, "other-seed", "--seed", "7")) == 0
    expected = _adapter(uninterrupted)
    assert all(torch.equal(expected[k], v) for k, v in _adapter(workdir / "again").items())
    assert not all(torch.equal(expected[k], v) for k, v in _adapter(workdir / "other-seed").items())
    trained_b = [v for k, v in expected.items() if "lora_B" in k]
    assert all(v.dtype == torch.float32 for v in expected.values()) and any(v.abs().sum() > 0 for v in trained_b)


@pytest.fixture(scope="module")
def tiny_batch(tiny_model):
    tokenizer = load_tokenizer(resolve_model(str(tiny_model)))
    examples = [
        tokenize_conversation(tokenizer, parse_example(json.dumps(record)), max_seq_len=64)
        for record in (
            {"prompt": "Name a colour.", "completion": "Blue."},
            {"prompt": "And a longer answer, please?", "completion": "Certainly: red, green and gold."},
        )
    ]
    return collate(examples, tokenizer.pad_token_id)


def _tiny_peft(tiny_model: Path):
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("all-linear",), use_rslora=True)
    return load_for_training(resolve_model(str(tiny_model)), CPU, torch.bfloat16, lora, gradient_checkpointing=True)


def test_loss_is_transformers_own_on_the_trained_tokens(tiny_model, tiny_batch):
    model = _tiny_peft(tiny_model)
    ours = loss_sum(model, tiny_batch) / tiny_batch.targets
    theirs = model(
        input_ids=tiny_batch.input_ids, attention_mask=tiny_batch.attention_mask, labels=tiny_batch.labels
    ).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-3)


def test_the_saved_adapter_is_what_peft_loads(tiny_model, tiny_batch, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model = _tiny_peft(tiny_model)
    config = TrainConfig(max_steps=3, batch_size=2, grad_accum=1, lr=5e-2, save_every=0)
    examples = [
        tokenize_conversation(
            load_tokenizer(resolve_model(str(tiny_model))),
            parse_example(json.dumps({"prompt": "q", "completion": "answer"})),
            32,
        )
    ] * 2
    loop.train(model, examples, [], config, CPU, pad_id=0, run_dir=tmp_path, settings={})
    write_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    base = load_nf4_model(resolve_model(str(tiny_model)), CPU, torch.bfloat16)
    prepare_cpu_weights(base)  # the weights the trainer computed with, so the logits match bit for bit
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=tiny_batch.input_ids, attention_mask=tiny_batch.attention_mask).logits
        again = loaded(input_ids=tiny_batch.input_ids, attention_mask=tiny_batch.attention_mask).logits
    assert torch.equal(trained, again)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_rslora"] is True


@pytest.mark.slow
def test_a_real_run_on_the_embedded_model(workdir):
    """The CLI as a user runs it: the adapter, report and curve appear, loss falls, PEFT loads the result."""
    from peft import PeftModel

    output = workdir / "smollm-adapter"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "plait.cli",
            "train",
            "train.jsonl",
            "-o",
            output.name,
            "--eval-file",
            "eval.jsonl",
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--grad-accum",
            "1",
            "--lr",
            "2e-3",
            "--max-seq-len",
            "48",
            "--warmup-steps",
            "0",
            "--save-every",
            "2",
            "--publish",
            "http://127.0.0.1:1",
            # fp32 compute: bf16 on the CPU pays a one-off warm-up of 20 to 70 s in its first step; one
            # thread: two on a busy two-core machine made steps 5-10x slower (OpenMP oversubscription)
            "--dtype",
            "float32",
            "--threads",
            "1",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # Training succeeded, publishing to a closed port did not: status 1, and the adapter stays.
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "plait train: error: publishing failed (cannot reach http://127.0.0.1:1/v1" in result.stderr
    assert sorted(p.name for p in output.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "loss_curve.png",
        "training_report.json",
    ]
    assert (output / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = _report(output)
    losses = [loss for _, loss in report["train_loss"]]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0]
    assert [step for step, _ in report["eval_loss"]] == [3]
    assert report["base_model"]["name"] == "SmolLM2-135M-Instruct" and report["adapter_dtype"] == "float32"
    assert report["compute_dtype"] == "float32" and len(report["step_times"]) == 3
    assert report["tokens"] > report["target_tokens"] > 0 and report["tokens_per_second"] > 0
    assert report["peak_memory"]["bytes"] > 0 and report["epochs"] == 1.5
    assert report["config"]["lr"] == 2e-3 and "admin_key" not in report["config"]

    base = load_nf4_model(resolve_model(None), CPU, torch.bfloat16)
    model = PeftModel.from_pretrained(base, output)
    assert model.peft_config["default"].r == 16


def test_evaluating_between_steps_leaves_training_unchanged(tiny_model, tmp_path):
    """An evaluation runs the model in eval mode without gradients, where bitsandbytes would
    repack its 4-bit weights for its CPU inference kernel and later backward passes would read
    them wrongly; training with an evaluation after every step must equal training without."""
    tokenizer = load_tokenizer(resolve_model(str(tiny_model)))
    examples = [
        tokenize_conversation(tokenizer, parse_example(json.dumps({"prompt": f"q{i}", "completion": "an answer"})), 256)
        for i in range(4)
    ]
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=("all-linear",), use_rslora=False)
    trained = []
    for eval_every in (None, 1):
        torch.manual_seed(0)
        model = load_for_training(resolve_model(str(tiny_model)), CPU, torch.bfloat16, lora, False, cpu_weights="nf4")
        config = TrainConfig(max_steps=3, batch_size=2, grad_accum=1, lr=5e-2, save_every=0, eval_every=eval_every)
        loop.train(model, examples, examples if eval_every else [], config, CPU, 0, tmp_path / f"run-{eval_every}", {})
        trained.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert trained[0].keys() == trained[1].keys()
    for name, weight in trained[0].items():
        assert torch.equal(weight, trained[1][name]), name
