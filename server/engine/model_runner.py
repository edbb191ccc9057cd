"""One forward pass over the flattened tokens of every scheduled sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plait.server.engine.attention import SequenceChunk, build_attention_batch
from plait.server.engine.kv_cache import PagedKVCache
from plait.server.engine.lora import LoRALayers
from plait.server.engine.request import ScheduledChunk
from plait.server.engine.static_decode import StaticDecode


@dataclass(frozen=True)
class ChunkRows:
    """Which rows of a step's logits belong to one chunk."""

    scored: range  # positions p of the sequence whose logits score prompt token p + 1 (prompt logprobs)
    scored_rows: slice  # their rows, in order
    sample_row: int | None  # the row that picks the next token, if the chunk samples


@dataclass(frozen=True)
class StepLogits:
    logits: torch.Tensor  # float32 [rows, vocab]
    chunks: list[ChunkRows]  # in the order of the scheduled chunks


class ModelRunner:
    def __init__(
        self,
        model,
        kv_cache: PagedKVCache,
        device: torch.device,
        lora: LoRALayers | None = None,
        static: StaticDecode | None = None,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.lora = lora
        self.static = static  # plain decode steps run through its fixed buffers (CUDA graphs)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> StepLogits:
        """Logits (float32) at the last new token of each chunk that samples, and at every prompt
        position still to be scored for requests that want prompt logprobs."""
        if self.static is not None and self.static.fits(chunks):
            rows = [ChunkRows(range(0), slice(i, i), i) for i in range(len(chunks))]
            return StepLogits(self.static.run(chunks), rows)
        input_ids: list[int] = []
        positions: list[int] = []
        seq_chunks: list[SequenceChunk] = []
        keep: list[int] = []
        rows: list[ChunkRows] = []
        for c in chunks:
            offset = len(input_ids)
            input_ids += c.request.tokens(c.start, c.stop)
            positions += range(c.start, c.stop)
            seq_chunks.append(SequenceChunk(offset, c.start, c.stop, c.request.block_ids))
            scored = range(0)
            if c.request.params.prompt_logprobs is not None:
                # Position p scores prompt token p + 1; positions scored before a preemption are not redone.
                first = max(c.start, len(c.request.prompt_logprobs))
                scored = range(first, max(first, min(c.stop, len(c.request.prompt_ids) - 1)))
            scored_rows = slice(len(keep), len(keep) + len(scored))
            keep += [offset + p - c.start for p in scored]
            sample_row = None
            if c.samples:
                sample_row = len(keep)
                keep.append(len(input_ids) - 1)
            rows.append(ChunkRows(scored, scored_rows, sample_row))
        attention = build_attention_batch(seq_chunks, self.kv_cache, self.device)
        routed = []
        routes: dict[tuple, list[int]] = {}  # chunks of one router over the same slots share a route
        if self.lora is not None:
            # Each chunk is one contiguous segment of the flat batch, using its request's adapters.
            for i, c in enumerate(chunks):
                if c.request.router is not None:
                    routes.setdefault((c.request.router, tuple(c.request.slots)), []).append(i)
            routed = self.lora.set_segments(
                [c.num_new for c in chunks],
                [c.request.lora for c in chunks],
                [(router, segments) for (router, _), segments in routes.items()],
            )
        out = self.model(
            input_ids=torch.tensor([input_ids], device=self.device),
            position_ids=torch.tensor([positions], device=self.device),
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device),
            use_cache=False,
            plait_attention=attention,
        )
        # A request's routing report counts the tokens whose logits pick its answer's tokens:
        # the prompt's shared preamble (a chat template's) says nothing about the answer.
        for route, segments in zip(routed, routes.values(), strict=True):
            for i, totals in zip(segments, route.totals.split([chunks[i].num_new for i in segments]), strict=True):
                if chunks[i].samples:
                    chunks[i].request.routed += totals[-1].cpu()
        return StepLogits(out.logits[0].float(), rows)
