"""Decode steps through fixed buffers, so a step of a given batch size can be captured as a CUDA
graph once and replayed at the cost of one launch.

A graph replays the same kernels on the same memory, so every input of a decode step (token
ids, positions, KV write slots, block tables, lengths, LoRA slots) lives in buffers allocated
once for the largest batch, and a step copies its values into them (two host-to-device copies)
instead of building new tensors. A batch of B sequences runs at the smallest size P >= B
among `capture_sizes`; its P - B padding rows decode token 0 into the KV pool's scratch block,
attend to that block alone and use no adapter, and their logits are dropped.

Only plain decode steps fit (see `StaticDecode.fits`); any other step takes the dynamic path.
On CUDA every size is captured at start-up. Elsewhere the same buffers run eagerly: no faster
than the dynamic path, but it is how the CPU tests check the buffers against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from plait.kernels import BlockTables, LoRABatch, make_row_lora_batch
from plait.server.engine.attention import AttentionBatch, Decodes
from plait.server.engine.kv_cache import PagedKVCache
from plait.server.engine.lora import LoRALayers
from plait.server.engine.request import ScheduledChunk


def capture_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes, as vLLM picks them: 1, 2, 4, then every multiple of 8, up to max_batch."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch, 8))
    return [*sizes, max_batch]


@dataclass(frozen=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [size, vocab], rewritten by every replay
    lora: LoRABatch | None  # read by the replays; held so its tensors outlive them


class StaticDecode:
    def __init__(
        self,
        model,
        kv_cache: PagedKVCache,
        lora: LoRALayers | None,
        device: torch.device,
        max_batch: int,
        max_model_len: int,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.lora = lora
        self.sizes = capture_sizes(max_batch)
        self.width = -(-max_model_len // kv_cache.block_size)  # table entries per sequence
        p, w = max_batch, self.width
        self._longs = torch.zeros(3 * p, dtype=torch.long, device=device)
        self._ints = torch.zeros(p * (2 + w), dtype=torch.int32, device=device)
        self.input_ids, self.positions, self.write_slots = self._longs.view(3, p)
        self.lengths, self.lora_slots = self._ints[: 2 * p].view(2, p)
        self.tables = self._ints[2 * p :].view(p, w)
        self.rows = torch.arange(p, device=device)
        self._graphs: dict[int, _Captured] = {}

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def fits(self, chunks: Sequence[ScheduledChunk]) -> bool:
        """Whether a step can run here: at most max_batch chunks, each one token of its request's
        own output that samples the next, with no prompt to score, no router, and no adapter
        other than one at weight 1."""
        return 0 < len(chunks) <= self.max_batch and all(
            c.num_new == 1
            and c.samples
            and c.start >= len(c.request.prompt_ids)
            and c.request.params.prompt_logprobs is None
            and not isinstance(c.request.lora, Sequence)
            for c in chunks
        )

    @torch.inference_mode()
    def run(self, chunks: Sequence[ScheduledChunk]) -> torch.Tensor:
        """Logits (float32 [len(chunks), vocab]) for the next token of each chunk's request."""
        size = next(s for s in self.sizes if s >= len(chunks))
        slots = self._fill(chunks)
        captured = self._graphs.get(size)
        if captured is None:
            return self._forward(size, self._lora_batch(size, slots[:size]))[: len(chunks)].float()
        captured.graph.replay()
        # A copy: the next replay overwrites the captured logits.
        return captured.logits[: len(chunks)].to(torch.float32, copy=True)

    def capture(self) -> None:
        """Capture a graph of every size (CUDA only), the largest first so the smaller ones reuse its memory."""
        pool = None
        for size in reversed(self.sizes):
            self._fill([])
            lora = self._lora_batch(size, [-1] * size)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):  # compiles the Triton kernels and settles cuBLAS before capture
                    self._forward(size, lora)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), torch.inference_mode():
                logits = self._forward(size, lora)
            pool = graph.pool()
            self._graphs[size] = _Captured(graph, logits, lora)

    def _fill(self, chunks: Sequence[ScheduledChunk]) -> list[int]:
        """Write the step's inputs into the buffers, padding rows after the chunks'; returns every row's LoRA slot."""
        w, bs = self.width, self.kv_cache.block_size
        pad = self.max_batch - len(chunks)
        scratch = self.kv_cache.scratch_block
        ids, positions, write_slots, lengths, slots, tables = [], [], [], [], [], []
        for c in chunks:
            blocks = c.request.block_ids
            ids += c.request.tokens(c.start, c.stop)
            positions.append(c.start)
            write_slots.append(blocks[c.start // bs] * bs + c.start % bs)
            lengths.append(c.stop)
            slots.append(c.request.lora)
            tables += blocks[:w] + [0] * (w - min(len(blocks), w))
        ids += [0] * pad
        positions += [0] * pad
        write_slots += [scratch * bs] * pad
        lengths += [1] * pad
        slots += [-1] * pad
        tables += ([scratch] + [0] * (w - 1)) * pad
        self._longs.copy_(torch.tensor(ids + positions + write_slots))
        self._ints.copy_(torch.tensor(lengths + slots + tables, dtype=torch.int32))
        return slots

    def _lora_batch(self, size: int, slots: list[int]) -> LoRABatch | None:
        return None if self.lora is None else make_row_lora_batch(self.lora_slots[:size], slots)

    def _forward(self, size: int, lora: LoRABatch | None) -> torch.Tensor:
        if self.lora is not None:
            self.lora.use_batch(lora)
        bs = self.kv_cache.block_size
        attention = AttentionBatch(
            kv_cache=self.kv_cache,
            write_slots=self.write_slots[:size],
            prefills=(),
            decodes=Decodes(
                self.rows[:size], BlockTables(self.tables[:size], self.lengths[:size], bs, self.width * bs)
            ),
        )
        out = self.model(
            input_ids=self.input_ids[:size].view(1, size),
            position_ids=self.positions[:size].view(1, size),
            use_cache=False,
            plait_attention=attention,
        )
        return out.logits[0]
