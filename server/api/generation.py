"""`/v1/chat/completions` and `/v1/completions`: prompt in, engine outputs out as OpenAI JSON or SSE.

Everything that may take long for a big request (resolving adapters, building a router,
applying the chat template and tokenizing) runs on a worker thread, so the event loop that
serves every other client never waits for it. A prompt longer than the context could hold
even at the most characters a token can stand for is refused before it is tokenized.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from plait.server.api.context import ServerContext, get_context, require_api_key
from plait.server.api.errors import error_body, error_response
from plait.server.api.protocol import ChatCompletionRequest, CompletionRequest
from plait.server.api.schema import error_responses
from plait.server.api.served import Served, resolve
from plait.server.engine import FinishReason, RequestHandle, RequestOutput, SamplingParams, TokenLogprob
from plait.server.errors import ClientError

router = APIRouter(dependencies=[Depends(require_api_key)])
ERRORS = error_responses(400, 401, 404, 413, 429, 503)


@router.post("/v1/chat/completions", responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request, ctx: ServerContext = Depends(get_context)):
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    _refuse_surely_too_long(ctx, sum(len(m["content"]) for m in messages), "messages")
    return await _generate(ctx, body, request, lambda: _chat_prompt_ids(ctx, messages), "messages", _ChatFormat)


@router.post("/v1/completions", responses=ERRORS)
async def completions(body: CompletionRequest, request: Request, ctx: ServerContext = Depends(get_context)):
    prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
    if isinstance(prompt, str):
        _refuse_surely_too_long(ctx, len(prompt), "prompt")
    return await _generate(ctx, body, request, lambda: _completion_prompt_ids(ctx, prompt), "prompt", _CompletionFormat)


async def _generate(
    ctx: ServerContext,
    body: ChatCompletionRequest | CompletionRequest,
    request: Request,
    prompt_ids: Callable[[], list[int]],
    prompt_param: str,
    format_class: type[_Format],
):
    """Resolve what the request runs, tokenize, submit, and answer as JSON or a stream."""
    served = await asyncio.to_thread(resolve, ctx, body.model, body.adapters, body.combination)
    try:
        handle = _submit(ctx, await asyncio.to_thread(prompt_ids), body, served, prompt_param)
    except BaseException:
        served.release()
        raise
    fmt = format_class(ctx, served, body.return_tokens_as_token_ids)
    if body.stream:
        return _sse(handle, request, fmt, body.include_usage)
    return await _collect(handle, request, fmt)


def _refuse_surely_too_long(ctx: ServerContext, num_chars: int, param: str) -> None:
    limit = ctx.engine.max_model_len
    if num_chars > limit * ctx.max_token_chars:
        raise ClientError(
            f"The prompt is {num_chars} characters, more than this model's context length of {limit} tokens can hold.",
            param,
            "context_length_exceeded",
        )


def _chat_prompt_ids(ctx: ServerContext, messages: list[dict]) -> list[int]:
    try:
        return ctx.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as exc:  # the template itself refuses some orders of roles
        raise ClientError(
            f"The messages cannot be formatted with the model's chat template: {exc}", "messages"
        ) from None


def _completion_prompt_ids(ctx: ServerContext, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        prompt_ids = ctx.tokenizer.encode(prompt)
    else:
        vocab = len(ctx.tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise ClientError(f"Token ids in 'prompt' must lie in [0, {vocab}).", "prompt")
        prompt_ids = list(prompt)
    if not prompt_ids:
        raise ClientError("The prompt is empty.", "prompt")
    return prompt_ids


def _submit(
    ctx: ServerContext,
    prompt_ids: list[int],
    body: ChatCompletionRequest | CompletionRequest,
    served: Served,
    prompt_param: str,
) -> RequestHandle:
    """Hand the request to the engine, which releases `served` when the request ends."""
    limit = ctx.engine.max_model_len
    room = limit - len(prompt_ids)
    if room < 1:
        raise ClientError(
            f"The prompt is {len(prompt_ids)} tokens; this model's context length is {limit} "
            "tokens, with at least one left to generate.",
            prompt_param,
            "context_length_exceeded",
        )
    max_tokens = body.token_limit
    if max_tokens is None:
        max_tokens = min(ctx.default_max_tokens, room)
    elif max_tokens > room:
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise ClientError(
            f"max tokens is too large: {max_tokens}. The prompt is {len(prompt_ids)} tokens and "
            f"this model's context length is {limit} tokens.",
            param,
            "context_length_exceeded",
        )
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_strings(),
        top_logprobs=body.logprobs_wanted,
        ignore_eos=body.ignore_eos,
    )
    return ctx.engine.submit(
        prompt_ids,
        params,
        streaming=body.stream,
        adapters=served.adapters,
        router=served.router,
        on_finish=served.release,
    )


async def _collect(handle: RequestHandle, request: Request, fmt: _Format) -> JSONResponse:
    """Wait for the whole answer; a client that hangs up meanwhile frees its slot at once."""

    async def gather() -> list[RequestOutput]:
        async with contextlib.aclosing(handle.outputs()) as outputs:
            return [out async for out in outputs]

    async def disconnected() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    collector = asyncio.create_task(gather())
    watcher = asyncio.create_task(disconnected())
    await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if not collector.done():
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector
        handle.close()  # aborts in the engine, even if the collector never got to start
        return JSONResponse({}, status_code=499)
    outputs = collector.result()
    return _failure(outputs[-1]) or JSONResponse(fmt.full(outputs))


def _sse(handle: RequestHandle, request: Request, fmt: _Format, include_usage: bool) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        async with contextlib.aclosing(handle.outputs()) as outputs:
            yield _event(fmt.first_chunk())
            async for out in outputs:
                if out.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
                    yield _event(
                        error_body(
                            503 if out.finish_reason is FinishReason.ABORT else 500, out.error or "generation stopped"
                        )
                    )
                    break
                if out.text or out.logprobs or out.finish_reason:
                    yield _event(fmt.chunk(out))
                if out.finish_reason and include_usage:
                    yield _event(fmt.usage_chunk(out))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _failure(final: RequestOutput) -> JSONResponse | None:
    """The error answer for a request that did not finish, or None when it did."""
    if final.finish_reason is FinishReason.ABORT:
        return error_response(503, final.error or "The request was aborted.", code="unavailable")
    if final.finish_reason is FinishReason.ERROR:  # our fault, not the client's
        return error_response(500, "The server failed while generating.", code="generation_failed")
    return None


def _usage(out: RequestOutput) -> dict:
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "total_tokens": out.prompt_tokens + out.completion_tokens,
    }


class _Format:
    """How one endpoint words its answers: the whole body, or a stream of chunks."""

    id_prefix: str
    object_full: str
    object_chunk: str

    def __init__(self, ctx: ServerContext, served: Served, tokens_as_ids: bool = False):
        self.token_text: Callable[[int], str] = (lambda i: f"token_id:{i}") if tokens_as_ids else ctx.token_text
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.served = served
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.served.model, "choices": choices}

    def fusion(self, final: RequestOutput) -> dict:
        """Extension on a fusion's last answer: the weight each member got, averaged over the
        layers and the tokens whose logits chose the answer (a fixed-weights fusion: its weights)."""
        fusion = self.served.fusion
        if fusion is None:
            return {}
        weights = fusion.weights if fusion.weights is not None else final.routing
        members = [{"id": m, "weight": w} for m, w in zip(fusion.members, weights or (), strict=False)]
        return {"fusion": {"id": fusion.id, "router": fusion.router, "top_k": fusion.top_k, "members": members}}

    def usage_chunk(self, final: RequestOutput) -> dict:
        return {**self._envelope(self.object_chunk, []), "usage": _usage(final)}

    def full(self, outputs: list[RequestOutput]) -> dict:
        final = outputs[-1]
        text = "".join(o.text for o in outputs)
        logprobs = [lp for o in outputs for lp in o.logprobs]
        choice = self.choice(text, logprobs, final)
        return {**self._envelope(self.object_full, [choice]), "usage": _usage(final), **self.fusion(final)}

    def first_chunk(self) -> dict: ...
    def chunk(self, out: RequestOutput) -> dict: ...
    def choice(self, text: str, logprobs: list[TokenLogprob], final: RequestOutput) -> dict: ...


class _ChatFormat(_Format):
    id_prefix = "chatcmpl"
    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def _logprobs(self, logprobs, wanted: bool) -> dict | None:
        if not wanted:
            return None
        return {"content": [self._entry(lp) for lp in logprobs], "refusal": None}

    def _entry(self, lp: TokenLogprob) -> dict:
        token = self.token_text(lp.token_id)
        return {
            "token": token,
            "logprob": lp.logprob,
            "bytes": list(token.encode()),
            "top_logprobs": [
                {"token": (t := self.token_text(i)), "logprob": v, "bytes": list(t.encode())} for i, v in lp.top
            ],
        }

    def first_chunk(self) -> dict:
        delta = {"role": "assistant", "content": ""}
        return self._envelope(
            self.object_chunk, [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]
        )

    def chunk(self, out: RequestOutput) -> dict:
        choice = {
            "index": 0,
            "delta": {"content": out.text} if out.text else {},
            "logprobs": self._logprobs(out.logprobs, bool(out.logprobs)),
            "finish_reason": out.finish_reason.value if out.finish_reason else None,
        }
        return {**self._envelope(self.object_chunk, [choice]), **(self.fusion(out) if out.finish_reason else {})}

    def choice(self, text: str, logprobs: list[TokenLogprob], final: RequestOutput) -> dict:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": self._logprobs(logprobs, bool(logprobs)),
            "finish_reason": final.finish_reason.value,
        }


class _CompletionFormat(_Format):
    id_prefix = "cmpl"
    object_full = "text_completion"
    object_chunk = "text_completion"

    def _logprobs(self, logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...], offset: int) -> dict | None:
        if not logprobs:
            return None
        tokens = [self.token_text(lp.token_id) for lp in logprobs]
        offsets, pos = [], offset
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{self.token_text(i): v for i, v in lp.top} for lp in logprobs],
            "text_offset": offsets,
        }

    def first_chunk(self) -> dict:
        return self._envelope(self.object_chunk, [{"index": 0, "text": "", "logprobs": None, "finish_reason": None}])

    def chunk(self, out: RequestOutput) -> dict:
        choice = {
            "index": 0,
            "text": out.text,
            "logprobs": self._logprobs(out.logprobs, 0),
            "finish_reason": out.finish_reason.value if out.finish_reason else None,
        }
        return {**self._envelope(self.object_chunk, [choice]), **(self.fusion(out) if out.finish_reason else {})}

    def choice(self, text: str, logprobs: list[TokenLogprob], final: RequestOutput) -> dict:
        return {
            "index": 0,
            "text": text,
            "logprobs": self._logprobs(logprobs, 0),
            "finish_reason": final.finish_reason.value,
        }
