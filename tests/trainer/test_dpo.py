"""Preference tuning (DPO) in `plait train`: against TRL's `DPOTrainer`, and end to end.

The reference comparison gives both the same tiny model, the same adapter to start from
(which TRL copies into a frozen "ref" adapter, its way of making an existing adapter the
reference), the same pairs as TRL tokenizes them, and the same optimizer settings. At the
first step policy and reference are the same model, so the loss is log 2 and every reward
0 on both sides; the second step's loss and rewards, computed after one AdamW update, and
the adapter after two updates must agree.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from plait.cli import main
from plait.server.base_model import resolve_model
from plait.trainer import loop
from plait.trainer.config import TrainConfig
from plait.trainer.masking import IGNORE_INDEX, TokenizedExample, TokenizedPair
from plait.trainer.model import LoraSettings, load_for_training
from plait.trainer.objectives import DPO

CPU = torch.device("cpu")
BETA = 0.1
PAIRS = [
    ("What colour is the sky?", "The sky is blue.", "Purple, obviously."),
    ("Name a fruit.", "An apple.", "A hammer."),
    ("How many legs has a cat?", "Four.", "Eleven, on Tuesdays."),
    ("Say hello.", "Hello!", "Go away."),
]


@pytest.fixture(scope="module")
def start_adapter(tiny_architecture, tmp_path_factory):
    """A non-zero adapter to start from, so the first update moves every LoRA weight."""
    from peft import LoraConfig, get_peft_model

    from plait.server.base_model import load_nf4_model

    folder = tmp_path_factory.mktemp("start") / "adapter"
    torch.manual_seed(0)
    base = load_nf4_model(resolve_model(str(tiny_architecture("llama"))), CPU, torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
        if "lora_" in name:  # values bf16 holds exactly: TRL keeps a quantized model's adapter in bf16
            p.data = p.data.bfloat16().float()
    model.save_pretrained(folder)
    return folder


def _peft_model(tiny_architecture, start_adapter):
    spec = resolve_model(str(tiny_architecture("llama")))
    lora = LoraSettings(4, 8, 0.0, ("all-linear",), False)
    return load_for_training(spec, CPU, torch.float32, lora, False, "nf4", init_adapter=start_adapter)


def _lora_weights(model) -> dict[str, torch.Tensor]:
    return {
        n.replace(".default", ""): p.detach().clone()
        for n, p in model.named_parameters()
        if "lora_" in n and ".ref." not in n
    }


def test_loss_rewards_and_updates_equal_trls(tiny_architecture, start_adapter, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from plait.server.base_model import load_tokenizer

    tokenizer = load_tokenizer(resolve_model(str(tiny_architecture("llama"))))
    rows = [
        {
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}],
        }
        for q, good, bad in PAIRS
    ]
    settings = dict(learning_rate=5e-3, weight_decay=0.0, max_grad_norm=1.0, warmup_steps=0, seed=0)
    theirs = _peft_model(tiny_architecture, start_adapter)  # TRL copies it as its "ref" adapter itself
    trainer = DPOTrainer(
        model=theirs,
        args=DPOConfig(
            output_dir=str(tmp_path / "trl"),
            beta=BETA,
            max_steps=2,
            per_device_train_batch_size=len(PAIRS),
            lr_scheduler_type="cosine",
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            gradient_checkpointing=False,
            save_strategy="no",
            max_length=None,
            dataloader_drop_last=False,
            bf16=False,
            **settings,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    # TRL stores a quantized model's adapter in bf16 (QLoRA's paper); Plait trains and keeps it in
    # fp32 (plait.trainer.model). Back to fp32 before TRL's optimizer is made, to compare the math.
    for param in theirs.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    # The very tokens TRL trains on, as Plait's pairs: prompt, then each answer as the target.
    tokenized = trainer.train_dataset
    pairs = [
        TokenizedPair(
            TokenizedExample(
                row["prompt_ids"] + row["chosen_ids"], [IGNORE_INDEX] * len(row["prompt_ids"]) + row["chosen_ids"]
            ),
            TokenizedExample(
                row["prompt_ids"] + row["rejected_ids"], [IGNORE_INDEX] * len(row["prompt_ids"]) + row["rejected_ids"]
            ),
        )
        for row in tokenized
    ]
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]

    ours = _peft_model(tiny_architecture, start_adapter)
    config = TrainConfig(
        max_steps=2, batch_size=len(PAIRS), grad_accum=1, lr=settings["learning_rate"], warmup_steps=0, save_every=0
    )
    progress = loop.train(
        ours, pairs, [], config, CPU, tokenizer.pad_token_id or 0, tmp_path / "ours", {}, objective=DPO(BETA)
    )

    # Step 1: policy = reference on both sides.
    assert progress.train_loss[0][1] == pytest.approx(math.log(2), abs=1e-6)
    assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # Step 2, after one update: the same loss and rewards (TRL's batch order is its own; the
    # means do not depend on it).
    ours_metrics = progress.train_metrics[1][1]
    assert progress.train_loss[1][1] == pytest.approx(logged[1]["loss"], rel=1e-3)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ours_metrics[name] == pytest.approx(logged[1][name], rel=1e-3, abs=1e-5), name
    assert abs(ours_metrics["rewards/margins"]) > 1e-3  # the update did move them
    # And the adapter after both updates.
    # Adam scales each element's step to about the learning rate whatever its gradient, so an
    # element whose gradient is almost zero steps by rounding noise (seen: 3e-5 on one of 256,
    # with one CPU thread instead of two); 1e-4 is 2% of one step, far below a wrong update.
    for name, weight in _lora_weights(ours).items():
        torch.testing.assert_close(weight, _lora_weights(theirs)[name], rtol=1e-3, atol=1e-4, msg=name)


def _write_pairs(path, openai_format: bool = True):
    lines = []
    for q, good, bad in PAIRS * 2:
        if openai_format:
            lines.append(
                {
                    "input": {"messages": [{"role": "user", "content": q}]},
                    "preferred_output": [{"role": "assistant", "content": good}],
                    "non_preferred_output": [{"role": "assistant", "content": bad}],
                }
            )
        else:
            lines.append({"prompt": q, "chosen": good, "rejected": bad})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _dpo(tmp_path, folder, output, *extra):
    argv = ["train", tmp_path / "pairs.jsonl", "-o", tmp_path / output, "--model", folder, "--method", "dpo"]
    argv += ["--eval-file", tmp_path / "eval.jsonl", "--max-steps", "4", "--batch-size", "2", "--grad-accum", "1"]
    argv += ["--lr", "2e-2", "--dtype", "float32", "--threads", "1", "--save-every", "2", *extra]
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in argv])
    return exited.value.code


@pytest.mark.slow
def test_dpo_from_an_adapter_learns_the_preference_and_resumes_exactly(
    tiny_architecture, start_adapter, tmp_path, interrupt_after_checkpoint
):
    folder = tiny_architecture("llama")
    _write_pairs(tmp_path / "pairs.jsonl")
    _write_pairs(tmp_path / "eval.jsonl", openai_format=False)
    start = ("--init-adapter", start_adapter, "--events", tmp_path / "events.jsonl")
    assert _dpo(tmp_path, folder, "whole", *start) == 0
    report = json.loads((tmp_path / "whole" / "training_report.json").read_text())
    assert report["method"] == "dpo" and report["config"]["beta"] == BETA
    assert report["prepare_seconds"] > 0  # the reference pass, before the timed steps
    assert report["config"]["init_adapter"] == str(start_adapter)
    # The reference is the starting adapter: the first step's loss is log 2 and its rewards 0.
    assert report["train_loss"][0][1] == pytest.approx(math.log(2), abs=1e-6)
    assert report["train_metrics"][0][1]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    # Four steps on the same eight pairs: the preferred answers gain on the others.
    final = report["eval_metrics"][-1][1]
    assert (
        report["eval_loss"][-1][1] < math.log(2) and final["rewards/margins"] > 0 and final["rewards/accuracies"] > 0.5
    )
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["type"] == "step"]
    assert [e["metrics"] for e in steps] == [m for _, m in report["train_metrics"]]
    assert set(steps[0]["metrics"]) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}

    # Interrupted after its first checkpoint and resumed: the reference is computed again from
    # the starting adapter, and the result is the uninterrupted one.
    interrupt_after_checkpoint(_dpo, tmp_path, folder, "resumed", "--init-adapter", start_adapter)
    assert _dpo(tmp_path, folder, "resumed", "--init-adapter", start_adapter, "--resume") == 0
    resumed = json.loads((tmp_path / "resumed" / "training_report.json").read_text())
    assert resumed["train_loss"] == report["train_loss"] and resumed["train_metrics"] == report["train_metrics"]
    from safetensors.torch import load_file

    whole, again = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("whole", "resumed"))
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--beta", "0"), "--beta must be in (0, 2]"),
        (("--beta", "3"), "--beta must be in (0, 2]"),
        (("--init-adapter", "/nonexistent"), "is not a PEFT adapter folder"),
        (("--init-adapter", "{adapter}", "--lora-r", "8"), "--lora-r cannot be combined with --init-adapter"),
    ],
)
def test_bad_dpo_settings_are_refused_before_loading(tmp_path, start_adapter, capsys, extra, message):
    _write_pairs(tmp_path / "pairs.jsonl")
    argv = ["train", tmp_path / "pairs.jsonl", "-o", tmp_path / "out", "--method", "dpo"]
    argv += [str(e).replace("{adapter}", str(start_adapter)) for e in extra]
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in argv])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_sft_data_given_to_dpo_is_refused_line_by_line(tmp_path, capsys):
    (tmp_path / "chat.jsonl").write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    with pytest.raises(SystemExit) as exited:
        main(["train", str(tmp_path / "chat.jsonl"), "-o", str(tmp_path / "out"), "--method", "dpo"])
    assert (
        exited.value.code == 2
        and "line 1: unknown key completion (expected prompt, chosen, rejected)" in capsys.readouterr().err
    )
