"""Token ids and loss labels for a conversation, rendered with the model's own chat template.

Most chat templates (SmolLM2's included) carry no `{% generation %}` markers, so transformers'
`return_assistant_tokens_mask` cannot say which tokens the assistant wrote. Instead the
conversation is rendered to text, each trained assistant message is located in that text (its
content plus the end-of-turn token that follows it, so the model learns to stop), and the
tokens whose offsets start inside those spans are the only ones with labels.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.server.fine_tuning.contract import Conversation, PreferencePair, accepts_system_role, for_template

IGNORE_INDEX = -100  # the label cross-entropy skips (PyTorch's and transformers' convention)


class TemplateError(ValueError):
    """The chat template renders a conversation in a way the assistant turns cannot be found in."""


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # the token id where it is trained on, IGNORE_INDEX elsewhere

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def render(tokenizer, messages: Conversation, add_generation_prompt: bool = False) -> str:
    if not tokenizer.chat_template:
        raise TemplateError("the model's tokenizer has no chat template")
    chat = for_template([{"role": m.role, "content": m.content} for m in messages], accepts_system_role(tokenizer))
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: Conversation, text: str) -> list[tuple[int, int]]:
    """Character spans of the trained assistant messages in `text`, each with its end-of-turn token."""
    spans = []
    end_tokens = sorted(_special_tokens(tokenizer), key=len, reverse=True)
    cursor = 0
    for index, message in enumerate(messages, start=1):
        # Every message is located in order, not only the assistant's: the search for an
        # assistant reply then starts after the user message before it, which may quote it.
        if message.role == "assistant":
            # Where the template is prefix-stable (the usual case), the reply starts right
            # after the generation prompt, so a short reply cannot match inside the turn header.
            prompt = render(tokenizer, messages[: index - 1], add_generation_prompt=True)
            if text.startswith(prompt):
                cursor = max(cursor, len(prompt))
        start = text.find(message.content, cursor)
        if start < 0:
            if message.trained:
                raise TemplateError(f"the chat template changes the text of message {index} (assistant)")
            continue  # a template may rewrite system or user text; only the assistant's must be exact
        end = start + len(message.content)
        cursor = end
        if not message.trained:
            continue
        end_of_turn = next((t for t in end_tokens if text.startswith(t, end)), "")
        spans.append((start, end + len(end_of_turn)))
    return spans


def tokenize_conversation(tokenizer, messages: Conversation, max_seq_len: int) -> TokenizedExample | None:
    """Ids and labels, cut to max_seq_len tokens; None when the cut leaves no trained token."""
    text = render(tokenizer, messages)
    spans = assistant_spans(tokenizer, messages, text)
    # The template already wrote any BOS it wants; letting the tokenizer add another would
    # train on a sequence the server never sees.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"][:max_seq_len]
    offsets = encoding["offset_mapping"][:max_seq_len]
    # A token is trained if it overlaps a span: where a template writes "[/INST] " + reply
    # (Mistral), the reply's first token is " The", starting one character before the reply.
    labels = [
        token if any(token_start < end and start < token_end for start, end in spans) else IGNORE_INDEX
        for token, (token_start, token_end) in zip(input_ids, offsets, strict=True)
    ]
    example = TokenizedExample(input_ids, labels)
    return example if example.trained_tokens else None


def _special_tokens(tokenizer) -> set[str]:
    # The end-of-turn marker is a special token (<|im_end|>, <|eot_id|>, </s>); the empty
    # string never matches usefully and is left out.
    return {t for t in tokenizer.all_special_tokens if t}


@dataclass(frozen=True)
class TokenizedPair:
    """A preference pair as DPO trains on it: the prompt with each answer, only the answer trained."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    # Log-probabilities of both answers under the reference model (the starting point), once known.
    reference: tuple[float, float] | None = None


def tokenize_pair(tokenizer, pair: PreferencePair, max_seq_len: int) -> TokenizedPair | None:
    """Both sides cut to max_seq_len tokens; None when a cut leaves either answer no trained token."""
    chosen, rejected = (tokenize_conversation(tokenizer, c, max_seq_len) for c in pair.conversations())
    return TokenizedPair(chosen, rejected) if chosen and rejected else None
