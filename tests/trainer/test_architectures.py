"""`plait train` on every architecture Plait serves, with each family's own chat template.

The loss mask is computed from the template the model ships (verbatim copies in
tests/fixtures/chat_templates): the trained tokens are exactly each assistant reply and the
end-of-turn marker after it, whatever the template writes around them. Then a few real QLoRA
steps run on a tiny random model of each architecture, and the adapter loads in PEFT and in
Plait's own reader against the served model's layers.
"""

from __future__ import annotations

import json

import pytest
import torch

from plait.cli import main
from plait.server.adapters.format import base_lora_targets, read_adapter
from plait.server.base_model import SUPPORTED_MODEL_TYPES, load_nf4_model, resolve_model
from plait.server.fine_tuning.contract import parse_example
from plait.trainer.masking import IGNORE_INDEX, tokenize_conversation

CPU = torch.device("cpu")
# What ends an assistant turn in each template (SmolLM2's eos, <|im_end|>, where it writes eos_token).
END_OF_TURN = {
    "llama3": "<|eot_id|>",
    "mistral": "<|im_end|>",
    "qwen2_5": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "gemma2": "<end_of_turn>",
    "gemma3": "<end_of_turn>",
    "phi3": "<|end|>",
    "phi4": "<|im_end|>",
}
CHAT = {
    "messages": [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "The sky is blue."},
        {"role": "user", "content": "And grass?"},
        {"role": "assistant", "content": "Grass is green."},
    ]
}


@pytest.mark.parametrize("template", sorted(END_OF_TURN))
def test_only_the_replies_and_their_end_of_turn_are_trained(chat_tokenizers, template):
    tokenizer = chat_tokenizers(template)
    example = tokenize_conversation(tokenizer, parse_example(json.dumps(CHAT)), 512)
    runs, run = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    end = END_OF_TURN[template]
    # Mistral writes "[/INST] " + reply: the reply's first token carries that space.
    assert [tokenizer.decode(r).lstrip() for r in runs] == [f"The sky is blue.{end}", f"Grass is green.{end}"]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES))
def test_a_few_qlora_steps_give_an_adapter_peft_and_plait_load(tiny_architecture, tmp_path, model_type):
    from peft import PeftModel

    folder = tiny_architecture(model_type)
    data = tmp_path / "train.jsonl"
    data.write_text((json.dumps(CHAT) + "\n") * 4)
    argv = ["train", data, "-o", tmp_path / "adapter", "--model", folder, "--max-steps", "2", "--batch-size", "2"]
    argv += ["--lora-r", "4", "--lr", "5e-2", "--dtype", "float32", "--threads", "1"]
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in argv])
    assert exited.value.code == 0
    report = json.loads((tmp_path / "adapter" / "training_report.json").read_text())
    assert report["steps"] == 2 and all(loss == loss for _, loss in report["train_loss"])  # finite

    spec = resolve_model(str(folder))
    base = load_nf4_model(spec, CPU, torch.float32)
    targets = base_lora_targets(base)
    adapter = read_adapter(tmp_path / "adapter", targets, 64)
    assert set(adapter.modules) == set(targets)  # all-linear: every layer the server can adapt
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.inference_mode():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, tmp_path / "adapter")(ids).logits
    assert not torch.allclose(before, after)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES))
def test_train_router_gives_gates_the_server_accepts(tiny_architecture, tmp_path, model_type):
    from peft import LoraConfig, get_peft_model

    from plait.server.adapters.routers import check_learned_router

    folder = tiny_architecture(model_type)
    spec = resolve_model(str(folder))
    targets = base_lora_targets(load_nf4_model(spec, CPU, torch.float32))
    members = {}
    for i, modules in enumerate(("all-linear", sorted({path.rsplit(".", 1)[1] for path in targets})[:2])):
        model = get_peft_model(load_nf4_model(spec, CPU, torch.float32), LoraConfig(r=4, target_modules=modules))
        model.save_pretrained(tmp_path / f"member-{i}")
        data = tmp_path / f"member-{i}.jsonl"
        data.write_text(
            "".join(json.dumps({"prompt": f"Skill {i}, case {n}", "completion": "done"}) + "\n" for n in range(3))
        )
        members[f"member-{i}"] = (tmp_path / f"member-{i}", data)
    argv = ["train-router", "--output", tmp_path / "router", "--model", folder, "--dtype", "float32"]
    argv += ["--epochs", "1", "--max-examples", "3", "--threads", "1"]
    for name, (adapter, data) in members.items():
        argv += ["--adapter", f"{name}={adapter}", "--data", f"{name}={data}"]
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in argv])
    assert exited.value.code == 0
    adapters = [read_adapter(adapter, targets, 64) for adapter, _ in members.values()]
    check_learned_router((tmp_path / "router" / "router.safetensors").read_bytes(), adapters, targets)


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES))
def test_the_loss_is_transformers_own(tiny_architecture, model_type):
    """Plait projects only the trained positions onto the vocabulary; the loss is still the
    model's own, final soft-capping of Gemma 2's logits included."""
    from plait.server.base_model import load_tokenizer
    from plait.trainer.batching import collate
    from plait.trainer.model import LoraSettings, load_for_training, loss_sum

    spec = resolve_model(str(tiny_architecture(model_type)))
    lora = LoraSettings(4, 8, 0.0, ("all-linear",), False)
    model = load_for_training(spec, CPU, torch.float32, lora, gradient_checkpointing=False, cpu_weights="nf4")
    example = tokenize_conversation(load_tokenizer(spec), parse_example(json.dumps(CHAT)), 512)
    batch = collate([example, example], pad_id=0)
    with torch.no_grad():
        ours = loss_sum(model, batch) / batch.targets
        theirs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
