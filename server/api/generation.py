"""`/v1/chat/completions` and `/v1/completions`: prompts in, engine outputs out as OpenAI JSON or SSE.

A request becomes one engine request per choice: `n` of them for each of its prompts (a
completion may send several), each with its own seed (the request's seed plus the choice's
place) and, when the answer is constrained, its own grammar matcher. Everything that may take
long for a big request (resolving adapters, building a router, compiling a grammar, applying
the chat template and tokenizing) runs on a worker thread, so the event loop that serves every
other client never waits for it. A prompt longer than the context could hold even at the most
characters a token can stand for is refused before it is tokenized.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from plait.server.api.chat_format import ToolCallParser
from plait.server.api.context import ServerContext, get_context, require_api_key
from plait.server.api.errors import error_body, error_response
from plait.server.api.protocol import ChatCompletionRequest, CompletionRequest
from plait.server.api.responses import AnswerFormat, ChatAnswer, Choice, CompletionAnswer, Echo
from plait.server.api.schema import error_responses
from plait.server.api.served import Served, resolve
from plait.server.engine import FinishReason, RequestHandle, RequestOutput, SamplingParams
from plait.server.errors import ClientError

router = APIRouter(dependencies=[Depends(require_api_key)])
ERRORS = error_responses(400, 401, 404, 413, 429, 503)


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    echo: Echo | None = None


@router.post("/v1/chat/completions", responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request, ctx: ServerContext = Depends(get_context)):
    body.check(ctx.max_n)
    _refuse_surely_too_long(ctx, sum(len(m.text()) for m in body.messages), "messages")

    def prepare() -> tuple[list[Prompt], object]:
        grammar = ctx.chat_format.tool_grammar(body, ctx.grammars) or ctx.grammars.for_request(body)
        return [Prompt(ctx.chat_format.prompt_ids(body))], grammar

    def answer(served: Served) -> ChatAnswer:
        return ChatAnswer(ctx.token_text, served, body.return_tokens_as_token_ids)

    return await _generate(ctx, body, request, prepare, answer, "messages", tools=body.calls_tools)


@router.post("/v1/completions", responses=ERRORS)
async def completions(body: CompletionRequest, request: Request, ctx: ServerContext = Depends(get_context)):
    body.check(ctx.max_n)
    for prompt in body.prompts:
        if isinstance(prompt, str):
            _refuse_surely_too_long(ctx, len(prompt), "prompt")

    def prepare() -> tuple[list[Prompt], object]:
        prompts = [_completion_prompt(ctx, p, body.echo) for p in body.prompts]
        return prompts, ctx.grammars.for_request(body)

    def answer(served: Served) -> CompletionAnswer:
        return CompletionAnswer(ctx.token_text, served, body.return_tokens_as_token_ids, body.logprobs is not None)

    return await _generate(ctx, body, request, prepare, answer, "prompt", tools=False)


async def _generate(
    ctx: ServerContext,
    body: ChatCompletionRequest | CompletionRequest,
    request: Request,
    prepare: Callable[[], tuple[list[Prompt], object]],
    make_answer: Callable[[Served], AnswerFormat],
    prompt_param: str,
    tools: bool,
):
    """Resolve what the request runs, prepare its prompts and grammar, submit every choice, and
    answer as JSON or a stream."""
    served = await asyncio.to_thread(resolve, ctx, body.model, body.adapters, body.combination)
    choices: list[tuple[Choice, RequestHandle]] = []
    try:
        prompts, grammar = await asyncio.to_thread(prepare)
        count = len(prompts) * body.n
        finished = served.release_after(count)
        for p, prompt in enumerate(prompts):
            for j in range(body.n):
                params = _params(ctx, body, prompt.token_ids, prompt_param, seed_offset=j, grammar=grammar)
                try:
                    handle = _submit(ctx, prompt.token_ids, params, body.stream, served, finished)
                except BaseException:
                    for _ in range(count - len(choices)):
                        finished()  # the choices never submitted count as ended
                    raise
                parser = ToolCallParser() if tools else None
                choices.append((Choice(p * body.n + j, prompt.echo, parser, first_of_prompt=j == 0), handle))
    except BaseException:
        served.release()  # when nothing was submitted; otherwise the last choice to end releases
        for _, handle in choices:
            handle.close()
        raise
    answer = make_answer(served)
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    if body.stream:
        return _sse(choices, request, answer, prompt_tokens, body.include_usage)
    return await _collect(choices, request, answer, prompt_tokens)


def _refuse_surely_too_long(ctx: ServerContext, num_chars: int, param: str) -> None:
    limit = ctx.engine.max_model_len
    if num_chars > limit * ctx.max_token_chars:
        raise ClientError(
            f"The prompt is {num_chars} characters, more than this model's context length of {limit} tokens can hold.",
            param,
            "context_length_exceeded",
        )


def _completion_prompt(ctx: ServerContext, prompt: str | list[int], echo: bool) -> Prompt:
    if isinstance(prompt, str):
        token_ids = ctx.tokenizer.encode(prompt)
        text = prompt
    else:
        vocab = len(ctx.tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise ClientError(f"Token ids in 'prompt' must lie in [0, {vocab}).", "prompt")
        token_ids = list(prompt)
        text = ctx.tokenizer.decode(token_ids) if echo else ""
    if not token_ids:
        raise ClientError("The prompt is empty.", "prompt")
    return Prompt(token_ids, Echo(text, token_ids) if echo else None)


def _params(
    ctx: ServerContext,
    body: ChatCompletionRequest | CompletionRequest,
    prompt_ids: list[int],
    prompt_param: str,
    seed_offset: int,
    grammar: object,
) -> SamplingParams:
    limit = ctx.engine.max_model_len
    room = limit - len(prompt_ids)
    scoring_only = isinstance(body, CompletionRequest) and body.echo and body.max_tokens == 0
    if room < (0 if scoring_only else 1):
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
    echo_logprobs = isinstance(body, CompletionRequest) and body.echo and body.logprobs is not None
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=max(body.top_k, 0),
        min_p=body.min_p,
        seed=None if body.seed is None else body.seed + seed_offset,
        stop=body.stop_strings(),
        top_logprobs=body.logprobs_wanted,
        prompt_logprobs=body.logprobs if echo_logprobs or scoring_only else None,
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=body.bias(),
        grammar=grammar,
    )


def _submit(
    ctx: ServerContext,
    prompt_ids: list[int],
    params: SamplingParams,
    stream: bool,
    served: Served,
    finished: Callable[[], None],
) -> RequestHandle:
    return ctx.engine.submit(
        prompt_ids, params, streaming=stream, adapters=served.adapters, router=served.router, on_finish=finished
    )


async def _collect(
    choices: list[tuple[Choice, RequestHandle]], request: Request, answer: AnswerFormat, prompt_tokens: int
) -> JSONResponse:
    """Wait for every choice; a client that hangs up meanwhile frees their slots at once."""

    async def gather(choice: Choice, handle: RequestHandle) -> None:
        async with contextlib.aclosing(handle.outputs()) as outputs:
            choice.outputs = [out async for out in outputs]

    async def disconnected() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    collector = asyncio.ensure_future(asyncio.gather(*(gather(c, h) for c, h in choices)))
    watcher = asyncio.create_task(disconnected())
    await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if not collector.done():
        collector.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collector
        for _, handle in choices:
            handle.close()  # aborts in the engine, even if a collector never got to start
        return JSONResponse({}, status_code=499)
    collector.result()
    ended = [c for c, _ in choices]
    for choice in ended:
        failure = _failure(choice.final)
        if failure is not None:
            return failure
    return JSONResponse(answer.full(ended, prompt_tokens))


def _sse(
    choices: list[tuple[Choice, RequestHandle]],
    request: Request,
    answer: AnswerFormat,
    prompt_tokens: int,
    include_usage: bool,
) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        merged: asyncio.Queue[tuple[Choice, RequestOutput | None]] = asyncio.Queue()

        async def follow(choice: Choice, handle: RequestHandle) -> None:
            try:
                async with contextlib.aclosing(handle.outputs()) as outputs:
                    async for out in outputs:
                        await merged.put((choice, out))
            finally:
                await merged.put((choice, None))

        followers = [asyncio.create_task(follow(c, h)) for c, h in choices]
        try:
            for choice, _ in choices:
                first = answer.start(choice)
                if first is not None:
                    yield _event(first)
            open_choices = len(choices)
            while open_choices:
                choice, out = await merged.get()
                if out is None:
                    open_choices -= 1
                    continue
                choice.outputs.append(out)
                if out.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
                    status = 503 if out.finish_reason is FinishReason.ABORT else 500
                    yield _event(error_body(status, out.error or "generation stopped"))
                    return
                chunk = answer.chunk(choice, out)
                if chunk is not None:
                    yield _event(chunk)
            if include_usage:
                yield _event(answer.usage_chunk([c for c, _ in choices], prompt_tokens))
            yield "data: [DONE]\n\n"
        finally:
            for task in followers:
                task.cancel()
            for _, handle in choices:
                handle.close()

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
