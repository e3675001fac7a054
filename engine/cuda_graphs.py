"""CUDA graphs for the two step shapes that are launch-bound: decode (the whole step captured once per
padded batch size) and a lone short prefill (one graph per token bucket), both replayed with persistent
input buffers.

Pad rows point at state slot 0 and KV page 0 (both reserved), so replaying a padded graph never touches
a live request. A prefill of T tokens replays the graph of the smallest bucket > T: the other tokens form
a second sequence on the pad slot, whose keys and values all go to slot 0 of page 0. Mixed steps, longer
prefills and steps that need every token's logits run eagerly.
"""
from __future__ import annotations

import gc
import logging
from contextlib import contextmanager

import torch

from hybridserve.kernels.backend import pick
from hybridserve.models.batch import BatchMeta
from hybridserve.models.cache import CacheView

log = logging.getLogger("hybridserve.engine")


def capture_sizes(max_bs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4) if s <= max_bs] + list(range(8, max_bs + 1, 8))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


@contextmanager
def gc_paused():
    """Python's collector off while capturing: a collection then may free CUDA objects (tensors, graphs,
    pinned host buffers of an earlier engine) whose release calls what a capture forbids, invalidating it
    (seen on an H100 when engines were built one after another in one process)."""
    gc.collect()
    torch.cuda.synchronize()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def capture(fn, pool, stream: torch.cuda.Stream):
    """Two warm-up calls of fn on a side stream (Triton compiles, allocator settles), then one captured
    into a graph on `pool`: (graph, fn's result, whose tensors each replay refills)."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with gc_paused(), torch.cuda.graph(g, pool=pool):
        out = fn()
    return g, out


class HostMirror:
    """Pinned host copies of a graph's input buffers, refilled on the host each step and copied in without a
    synchronisation; `arrays()` first waits for the copies that read the previous fill."""

    def __init__(self, *tensors: torch.Tensor):
        self.tensors = tensors
        self._copied: torch.cuda.Event | None = None

    def arrays(self) -> tuple:
        if self._copied is not None:
            self._copied.synchronize()
        return tuple(t.numpy() for t in self.tensors)

    def copied(self) -> None:
        """Marks the copies just enqueued from these buffers."""
        if self._copied is None:
            self._copied = torch.cuda.Event()
        self._copied.record()


class DecodeGraphs:
    """Decode-step graphs per padded batch size over persistent inputs. `run_chunks` fills them from the
    scheduled chunks through pinned host mirrors: one copy for the five int64 rows (token, position, state
    slot, KV slot, previous-step row), one for the sequence lengths and, when the model has KV, one for the
    block tables' used columns, so the step costs its copies and one replay instead of a metadata build and
    a copy per field.
    Each graph also leaves each row's argmax beside the logits (`last_argmax`) for all-greedy batches."""

    def __init__(self, model, cache: CacheView, max_bs: int, max_blocks: int, sizes: list[int] | None = None):
        self.model, self.cache = model, cache
        self.max_bs, self.max_blocks = max_bs, max_blocks
        self.uses_kv = bool(cache.kv)
        dev = model.device
        self.i64 = torch.zeros(5, max_bs, dtype=torch.long, device=dev)
        # prev_rows: in an async-scheduled step (engine/inflight.py), the row of the previous step's device
        # tokens each row takes as its input
        self.input_ids, self.positions, self.slot_ids, self.slot_mapping, self.prev_rows = self.i64.unbind(0)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=dev)
        self.cu_seqlens = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.rows = torch.arange(max_bs, dtype=torch.long, device=dev)
        self.sizes = sorted(sizes) if sizes else capture_sizes(max_bs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.argmax: dict[int, torch.Tensor] = {}
        self.last_argmax: torch.Tensor | None = None
        self.host = HostMirror(torch.zeros(5, max_bs, dtype=torch.long, pin_memory=True),
                               torch.ones(max_bs, dtype=torch.int32, pin_memory=True),
                               torch.zeros(max_bs, max_blocks if self.uses_kv else 1, dtype=torch.int32,
                                           pin_memory=True))

    def _meta(self, bs: int) -> BatchMeta:
        return BatchMeta(
            input_ids=self.input_ids[:bs], positions=self.positions[:bs], cu_seqlens=self.cu_seqlens[:bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:bs],
            slot_ids=self.slot_ids[:bs], logits_indices=self.rows[:bs], query_lens_cpu=[1] * bs,
            seq_lens_cpu=[1] * bs, is_decode=True,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            meta = self._meta(bs)
            self.graphs[bs], (self.outputs[bs], self.argmax[bs]) = capture(self._step(meta), pool, stream)
        torch.cuda.synchronize()
        log.info("captured decode graphs for batch sizes %s", self.sizes)

    def _step(self, meta: BatchMeta):
        """The captured step: the forward's logits and each row's argmax (the token a greedy request gets)."""
        def step():
            out = self.model.forward(meta, self.cache)
            return out, pick("sampling", out.device).argmax(out)
        return step

    def padded_size(self, batch: int) -> int | None:
        return next((s for s in self.sizes if s >= batch), None)

    @torch.inference_mode()
    def run_chunks(self, chunks: list, page_size: int, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, V] of one-token chunks (engine/model_runner.py SeqChunk, each wanting logits); pad rows
        [B, bs) use slot 0, KV slot 0 and page 0 with one token of context. With `prev_tokens` (the previous
        step's tokens on the device) every chunk's token is its `prev_row` of them, gathered on the device
        before the replay. A view of the graph's output, valid until the next replay."""
        B = len(chunks)
        bs = self.padded_size(B)
        h64, h32, hbt = self.host.tensors
        a64, a32, abt = self.host.arrays()
        a64[:, :bs] = 0
        a32[:bs] = 1
        w = 1
        for r, c in enumerate(chunks):
            t = c.start
            a64[0, r], a64[1, r], a64[2, r], a64[4, r] = c.tokens[0], t, c.slot, c.prev_row
            a32[r] = t + 1
            if c.pages:
                a64[3, r] = c.pages[t // page_size] * page_size + t % page_size
                w = max(w, len(c.pages))
        self.i64.copy_(h64, non_blocking=True)
        self.seq_lens.copy_(h32, non_blocking=True)
        if self.uses_kv:
            abt[:bs, :w] = 0
            for r, c in enumerate(chunks):
                abt[r, :len(c.pages)] = c.pages
            self.block_tables[:bs, :w].copy_(hbt[:bs, :w], non_blocking=True)
        self.host.copied()
        if prev_tokens is not None:
            assert all(c.prev_row >= 0 for c in chunks), "an async-scheduled step takes every token from the last"
            torch.index_select(prev_tokens, 0, self.prev_rows[:B], out=self.input_ids[:B])
        self.graphs[bs].replay()
        self.last_argmax = self.argmax[bs][:B]
        return self.outputs[bs][:B]

    @torch.inference_mode()
    def run(self, meta: BatchMeta) -> torch.Tensor:
        """Logits [B, V]; a view of the graph's output buffer, valid until the next replay."""
        B = meta.num_seqs
        bs = self.padded_size(B)
        w = meta.block_tables.shape[1]
        self.input_ids[:B].copy_(meta.input_ids)
        self.positions[:B].copy_(meta.positions)
        self.slot_ids[:B].copy_(meta.slot_ids)
        self.slot_mapping[:B].copy_(meta.slot_mapping)
        self.seq_lens[:B].copy_(meta.seq_lens)
        self.block_tables[:B, :w].copy_(meta.block_tables)
        self.block_tables[:B, w:].zero_()
        if bs > B:  # pad rows: reserved slot 0 and page 0, one token of context
            self.input_ids[B:bs].zero_()
            self.positions[B:bs].zero_()
            self.slot_ids[B:bs].zero_()
            self.slot_mapping[B:bs].zero_()
            self.seq_lens[B:bs].fill_(1)
            self.block_tables[B:bs].zero_()
        self.graphs[bs].replay()
        self.last_argmax = self.argmax[bs][:B]
        return self.outputs[bs][:B]


PREFILL_BUCKETS = (32, 64, 128, 256, 512)
PREFILL_GRAPH_MAX_TOKENS = 4096      # longer chunks run eagerly (their GPU time outweighs the launches)


def prefill_buckets(max_chunk: int) -> tuple[int, ...]:
    """Token buckets for a scheduler chunking prompts at `max_chunk` tokens (at most
    PREFILL_GRAPH_MAX_TOKENS): powers of two from 32 to 512, then 1024, 2048, … + 16 up to the chunk size + 16
    (a bucket holds fewer tokens than its size, the rest being the pad sequence: a full 1024-token chunk
    fits 1040, not 2048)."""
    top = min(max_chunk, PREFILL_GRAPH_MAX_TOKENS)
    small = tuple(b for b in PREFILL_BUCKETS if b <= top)
    return small + tuple(b + 16 for b in (1024, 2048) if b < top) + (top + 16,)


class PrefillGraphs:
    """One sequence's prefill chunk of fewer than max(buckets) tokens, as a graph replay: a prompt's forward
    is a few hundred small launches whose host cost (~10 ms) would otherwise be its TTFT. A chunk that wants
    no logits (not the prompt's last) replays the same graph; its one logit row is left unread."""

    def __init__(self, model, cache: CacheView, max_blocks: int, buckets: tuple[int, ...] = PREFILL_BUCKETS):
        self.model, self.cache, self.max_blocks = model, cache, max_blocks
        self.buckets = tuple(sorted(buckets))
        dev = model.device
        n = self.buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.zeros(n, dtype=torch.long, device=dev)
        self.cu_seqlens = torch.zeros(3, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(2, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(2, max_blocks, dtype=torch.int32, device=dev)
        self.slot_ids = torch.zeros(2, dtype=torch.long, device=dev)
        self.logits_indices = torch.zeros(1, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _meta(self, bucket: int) -> BatchMeta:
        # the host lists size grids only (the largest query of the bucket); their values are never read
        return BatchMeta(
            input_ids=self.input_ids[:bucket], positions=self.positions[:bucket], cu_seqlens=self.cu_seqlens,
            seq_lens=self.seq_lens, block_tables=self.block_tables, slot_mapping=self.slot_mapping[:bucket],
            slot_ids=self.slot_ids, logits_indices=self.logits_indices, query_lens_cpu=[bucket, 1],
            seq_lens_cpu=[bucket, 1], is_decode=False,
        )

    def _fill(self, bucket: int, T: int) -> None:
        """Pad tokens [T, bucket): a second sequence on slot 0 whose k/v all land in slot 0 of page 0. It
        sits at position 0 with one token of context, so it reads no block-table entry but the first and
        no RoPE row but the first, whatever the bucket (its rows attend to at most that one key)."""
        self.input_ids[T:bucket].zero_()
        self.positions[T:bucket].zero_()
        self.slot_mapping[T:bucket].zero_()
        self.cu_seqlens[2].fill_(bucket)
        self.seq_lens[1].fill_(1)
        self.block_tables[1].zero_()
        self.slot_ids[1].zero_()

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for bucket in reversed(self.buckets):
            meta = self._meta(bucket)     # a 1-token prompt on the pad slot / page 0 (zeroed buffers)
            self.cu_seqlens[1].fill_(1)
            self.seq_lens[0].fill_(1)
            self._fill(bucket, 1)
            self.graphs[bucket], self.outputs[bucket] = capture(lambda: self.model.forward(meta, self.cache),
                                                                pool, stream)
        torch.cuda.synchronize()
        log.info("captured prefill graphs for token buckets %s", self.buckets)

    def bucket_for(self, meta: BatchMeta) -> int | None:
        """The graph that can run this step, if any: one sequence, fewer tokens than a bucket, at most one
        logit row."""
        if meta.is_decode or meta.num_seqs != 1 or meta.logits_indices.shape[0] > 1 \
                or meta.block_tables.shape[1] > self.max_blocks:
            return None
        T = meta.num_tokens
        return next((b for b in self.buckets if b > T), None)

    @torch.inference_mode()
    def run(self, meta: BatchMeta, bucket: int) -> torch.Tensor:
        """Logits [1, V] ([0, V] for a chunk that wants none); a view of the graph's output buffer, valid
        until the next replay."""
        T = meta.num_tokens
        w = meta.block_tables.shape[1]
        self.input_ids[:T].copy_(meta.input_ids)
        self.positions[:T].copy_(meta.positions)
        self.slot_mapping[:T].copy_(meta.slot_mapping)
        self.cu_seqlens[:2].copy_(meta.cu_seqlens)
        self.seq_lens[:1].copy_(meta.seq_lens)
        self.block_tables[0, :w].copy_(meta.block_tables[0])
        self.block_tables[0, w:].zero_()
        self.slot_ids[:1].copy_(meta.slot_ids)
        wanted = meta.logits_indices.shape[0]
        if wanted:
            self.logits_indices.copy_(meta.logits_indices)
        else:
            self.logits_indices.fill_(T - 1)
        self._fill(bucket, T)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:wanted]
