"""plait train's data side: the three file formats, every malformed-line case, loss masks, schedule, batching."""

from __future__ import annotations

import json
import math

import pytest

from plait.server.base_model import load_tokenizer, resolve_model
from plait.server.fine_tuning.contract import Message, parse_example
from plait.trainer.batching import collate, plan_steps
from plait.trainer.data import DataError, read_examples
from plait.trainer.masking import IGNORE_INDEX, TemplateError, tokenize_conversation
from plait.trainer.schedule import learning_rate, warmup_steps


def _write(tmp_path, lines: list) -> str:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines))
    return str(path)


# --- formats -------------------------------------------------------------------------------


def test_the_three_formats_become_conversations(tmp_path):
    path = _write(
        tmp_path,
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                ]
            },
            b"",  # blank lines are skipped but still counted
            {"prompt": "2+2?", "completion": "4"},
            {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
            {"instruction": "Name a colour.", "output": "Blue."},
            {"instruction": "Name a colour.", "input": "", "output": "Red."},
        ],
    )
    examples = read_examples(path)
    assert [e.line for e in examples] == [1, 3, 4, 5, 6]
    assert examples[0].messages == (
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", "Hello.", trained=True),
    )
    assert examples[1].messages == (Message("user", "2+2?"), Message("assistant", "4", trained=True))
    assert examples[2].messages == (Message("user", "Translate to French.\n\ncat"), Message("assistant", "chat", True))
    assert examples[3].messages[0] == Message("user", "Name a colour.")
    assert examples[4].messages[0] == Message("user", "Name a colour.")


def test_openai_weight_zero_keeps_a_reply_in_context_untrained():
    conversation = parse_example(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b", "weight": 0},
                    {"role": "user", "content": "c"},
                    {"role": "assistant", "content": "d", "weight": 1},
                ]
            }
        )
    )
    assert [m.trained for m in conversation] == [False, False, False, True]


MALFORMED = [
    (b"{not json", "invalid JSON"),
    (b"[1, 2]", "expected a JSON object, got a list"),
    (b'"text"', "expected a JSON object, got a string"),
    (b'{"text": "hello"}', "unknown format (keys: text)"),
    (b'{"messages": "hi"}', '"messages" must be a list, got a string'),
    (b'{"messages": []}', '"messages" is empty'),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    (b'{"messages": ["hi"]}', "message 1 must be an object, got a string"),
    (b'{"messages": [{"role": "robot", "content": "x"}]}', "message 1: role must be one of system, user, assistant"),
    (b'{"messages": [{"content": "x"}]}', "message 1: role must be one of system, user, assistant, got null"),
    (
        b'{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}',
        "message 1 (user): content must be a string, got a number",
    ),
    (
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}',
        "message 2 (assistant): content is empty",
    ),
    (
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null}]}',
        "message 2 (assistant): content must be a string, got null",
    ),
    (b'{"messages": [{"role": "tool", "content": "x"}]}', "tool and function calls are not supported"),
    (b'{"messages": [{"role": "user", "content": "q"}], "tools": []}', "tool and function definitions"),
    (b'{"messages": [{"role": "user", "content": "q", "mood": "x"}]}', "message 1 (user): unknown key mood"),
    (
        b'{"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]}',
        "weight must be 0 or 1, and only on assistant messages",
    ),
    (
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}',
        "every assistant message has weight 0",
    ),
    (b'{"prompt": "q"}', "missing completion"),
    (b'{"prompt": "q", "completion": ""}', '"completion" is empty'),
    (b'{"prompt": 1, "completion": "a"}', '"prompt" must be a string, got a number'),
    (b'{"prompt": "q", "completion": "a", "extra": 1}', "unknown key extra"),
    (b'{"instruction": "q", "input": ["x"], "output": "a"}', '"input" must be a string, got a list'),
    (b'{"instruction": "q"}', "missing output"),
    (b'{"messages": [], "id": 3}', "unknown key id next to messages"),
    (b'{"prompt": "caf\xe9", "completion": "a"}', "not valid UTF-8 (byte 16)"),
]


@pytest.mark.parametrize(("line", "expected"), MALFORMED, ids=[m[1][:40] for m in MALFORMED])
def test_each_malformed_line_is_named(tmp_path, line, expected):
    good = {"prompt": "q", "completion": "a"}
    with pytest.raises(DataError) as caught:
        read_examples(_write(tmp_path, [good, line, good]))
    [problem] = caught.value.problems
    assert problem.startswith("line 2: ") and expected in problem


def test_every_bad_line_is_reported_at_once_and_the_list_is_capped(tmp_path):
    lines = [{"prompt": "q", "completion": "a"} if i % 2 else b"oops" for i in range(60)]
    with pytest.raises(DataError) as caught:
        read_examples(_write(tmp_path, lines))
    error = caught.value
    assert error.total == 30
    assert str(error).endswith("30 problems")
    assert [p.split(":")[0] for p in error.problems] == [f"line {n}" for n in range(1, 40, 2)]
    assert error.details()[-1] == "... and 10 more"


def test_a_byte_order_mark_is_allowed_and_an_empty_file_is_not(tmp_path):
    assert len(read_examples(_write(tmp_path, [b'\xef\xbb\xbf{"prompt": "q", "completion": "a"}']))) == 1
    with pytest.raises(DataError, match="has no examples"):
        read_examples(_write(tmp_path, [b"", b"  "]))
    with pytest.raises(DataError, match="cannot be read"):
        read_examples(tmp_path / "missing.jsonl")


# --- loss masks ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(None))


def _trained_runs(tokenizer, example) -> list[str]:
    """The text of each contiguous run of trained tokens."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


def test_only_assistant_replies_and_their_end_of_turn_are_trained(tokenizer):
    conversation = parse_example(
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "You answer in one word."},
                    {"role": "user", "content": "Say assistant."},  # quotes the reply that follows
                    {"role": "assistant", "content": "assistant"},  # also a word of the template's turn header
                    {"role": "user", "content": "And now?"},
                    {"role": "assistant", "content": "skipped", "weight": 0},
                    {"role": "user", "content": "Last one."},
                    {"role": "assistant", "content": " Done:\nyes"},
                ]
            }
        )
    )
    example = tokenize_conversation(tokenizer, conversation, max_seq_len=512)
    assert _trained_runs(tokenizer, example) == ["assistant<|im_end|>", " Done:\nyes<|im_end|>"]
    untrained = tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label == IGNORE_INDEX]
    )
    for text in ("You answer in one word.", "Say assistant.", "And now?", "skipped", "Last one."):
        assert text in untrained
    # The ids are the chat template's own rendering, with no extra BOS.
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in conversation], tokenize=False
    )


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "What is 2+2?", "completion": "4, of course."},
        {"instruction": "What is 2+2?", "output": "4, of course."},
    ],
)
def test_prompt_completion_and_alpaca_train_on_the_answer(tokenizer, record):
    example = tokenize_conversation(tokenizer, parse_example(json.dumps(record)), max_seq_len=512)
    assert _trained_runs(tokenizer, example) == ["4, of course.<|im_end|>"]
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in tokenizer.decode(example.input_ids)


def test_truncation_keeps_a_partial_answer_and_drops_an_example_with_none(tokenizer):
    conversation = parse_example(json.dumps({"prompt": "Count.", "completion": "one two three four five"}))
    full = tokenize_conversation(tokenizer, conversation, max_seq_len=512)
    cut = tokenize_conversation(tokenizer, conversation, max_seq_len=len(full.input_ids) - 3)
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]
    assert 0 < cut.trained_tokens < full.trained_tokens
    first_trained = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    assert tokenize_conversation(tokenizer, conversation, max_seq_len=first_trained) is None


def test_a_template_that_rewrites_replies_is_refused(tokenizer):
    conversation = parse_example(json.dumps({"prompt": "q", "completion": "Answer"}))

    class Shouting:
        chat_template = "x"
        all_special_tokens = ["</s>"]

        def apply_chat_template(self, chat, tokenize, add_generation_prompt):
            return "".join(f"{m['role']}: {m['content'].upper()}</s>" for m in chat)

    with pytest.raises(TemplateError, match="changes the text of message 2"):
        tokenize_conversation(Shouting(), conversation, max_seq_len=64)


# --- schedule and batching -----------------------------------------------------------------


def test_warmup_then_cosine():
    lrs = [learning_rate(step, total_steps=10, warmup=2, peak_lr=1.0) for step in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    for step in range(2, 10):
        assert lrs[step] == pytest.approx(0.5 * (1 + math.cos(math.pi * (step - 2) / 8)))
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False)) and lrs[-1] > 0
    assert learning_rate(0, total_steps=4, warmup=0, peak_lr=3e-4) == 3e-4


def test_warmup_steps_from_ratio_or_count():
    assert warmup_steps(100, 0.03, None) == 3
    assert warmup_steps(10, 0.03, None) == 1  # rounded up: a little warmup is never none
    assert warmup_steps(100, 0.03, 7) == 7
    assert warmup_steps(5, 0.0, 50) == 5


def test_plan_covers_each_epoch_once_and_is_a_function_of_the_seed():
    plan = plan_steps(num_examples=10, batch_size=3, grad_accum=2, epochs=2, max_steps=None, seed=1)
    assert len(plan) == 4  # 4 micro-batches an epoch -> 2 steps
    for epoch in (0, 1):
        seen = [i for step in plan if step.epoch == epoch for micro in step.micro_batches for i in micro]
        assert sorted(seen) == list(range(10))
    assert plan == plan_steps(10, 3, 2, 2, None, seed=1)
    assert plan != plan_steps(10, 3, 2, 2, None, seed=2)
    longer = plan_steps(10, 3, 2, epochs=1, max_steps=5, seed=1)
    assert len(longer) == 5 and [s.epoch for s in longer] == [0, 0, 1, 1, 2]
    assert longer[:4] == plan


def test_collate_pads_right_and_counts_tokens():
    from plait.trainer.masking import TokenizedExample

    batch = collate([TokenizedExample([5, 6, 7], [-100, 6, 7]), TokenizedExample([8], [-100])], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels.tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert (batch.tokens, batch.targets) == (4, 2)
