"""CUDA graphs for the step shapes that are launch-bound: decode (the whole step captured once per padded
batch size) and short prefill steps (one graph per token bucket and capacity: up to
max(PREFILL_GRAPH_CAPACITIES) prompt chunks and decode rows), both replayed with persistent input buffers.

Pad rows point at state slot 0 and KV page 0 (both reserved), so replaying a padded graph never touches
a live request. A prefill step of T tokens replays the graph of the smallest bucket > T: the other tokens
form a pad sequence on the pad slot, whose keys and values all go to slot 0 of page 0. Longer steps, steps
of more sequences and steps that need every token's logits run eagerly.
"""
from __future__ import annotations

import gc
import logging
import math
from contextlib import contextmanager

import numpy as np
import torch

from hybridserve.kernels import input_fetch as input_fetch_reference
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


# The priority of the stream a graph is captured on, which its kernels keep (negative: above the default 0, the
# lowest; 0: torch's own capture stream). Where a step runs two streams (NanoHammer's state entries on a side
# stream at priority 0), the backbone's programs go first: NanoHammer batch 1 on an H100 −2.5 to −5 µs a step in
# four runs (1.054 vs 1.060 ms, bench/results/decode_latency_side-h100.json, variant "main_priority_high"; five
# rounds 1.0626 vs 1.0651, decode_latency_doubling2-h100.json, "capture_priority_default"); one-stream models even.
CAPTURE_PRIORITY = -1


def capture(fn, pool, stream: torch.cuda.Stream):
    """Two warm-up calls of fn on a side stream (Triton compiles, allocator settles), then one captured
    into a graph on `pool`: (graph, fn's result, whose tensors each replay refills)."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    capture_stream = torch.cuda.Stream(priority=CAPTURE_PRIORITY) if CAPTURE_PRIORITY else None
    with gc_paused(), torch.cuda.graph(g, pool=pool, stream=capture_stream):
        out = fn()
    return g, out


class PackedInputs:
    """A graph's per-step inputs as typed views of one device buffer, beside a pinned host buffer of the same
    layout (`dev` / `host`: name → tensor, `arrays()`: name → numpy view of the host one). A step fills the host
    views and brings them in without a synchronisation (`send`: the buffer's first `end` bytes, a 2-D part's
    used columns, tokens gathered on the device; one kernel reading the pinned buffer on a GPU,
    kernels/input_fetch*.py); then `sent()`. `arrays()` first waits for the reads of the previous fill. Every
    part starts 16-byte aligned (Triton specialises on pointer alignment)."""

    def __init__(self, device: torch.device, parts: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        self.offsets, end = {}, 0
        for name, (dtype, shape) in parts.items():
            self.offsets[name] = end
            end += -(-math.prod(shape) * dtype.itemsize // 16) * 16
        self.device_bytes = torch.zeros(end, dtype=torch.uint8, device=device)
        self.host_bytes = torch.zeros(end, dtype=torch.uint8, pin_memory=True)

        def views(buf: torch.Tensor) -> dict[str, torch.Tensor]:
            return {name: buf[self.offsets[name]:self.offsets[name] + math.prod(shape) * dtype.itemsize]
                    .view(dtype).view(shape) for name, (dtype, shape) in parts.items()}
        self.dev, self.host = views(self.device_bytes), views(self.host_bytes)
        self._arrays = {name: t.numpy() for name, t in self.host.items()}
        self._copied: torch.cuda.Event | None = None
        self._ops = pick("input_fetch", device)
        try:
            self._ops.warm(self.host_bytes, self.device_bytes)     # both still zero
        except ValueError:
            self._copy_instead()

    def arrays(self) -> dict[str, np.ndarray]:
        if self._copied is not None:
            self._copied.synchronize()
        return self._arrays

    def send(self, end: int | None = None, table: tuple[str, int, int] | None = None,
             gather: tuple[int, int, int, torch.Tensor] | None = None) -> None:
        """Bring the host buffer's first `end` bytes (all of it by default) in, without a synchronisation;
        table = (name, rows, cols): also the first `cols` columns of the first `rows` rows of that 2-D int32 part;
        gather = (dst, src, n, values), in int64 elements of the buffer: element dst + i takes
        values[host element src + i] for i < n (kernels/input_fetch.py)."""
        end = self.host_bytes.numel() if end is None else end
        if table is not None:
            name, rows, cols = table
            table = (self.offsets[name] // 4, self.host[name].shape[1], rows, cols)
        try:
            self._ops.fetch(self.host_bytes, self.device_bytes, end, table, gather)
        except ValueError:
            self._copy_instead()
            self._ops.fetch(self.host_bytes, self.device_bytes, end, table, gather)

    def element(self, view: torch.Tensor) -> int:
        """Where device view `view` starts in the buffer, in its own elements (a `send` gather's dst / src)."""
        return (view.data_ptr() - self.device_bytes.data_ptr()) // view.element_size()

    def _copy_instead(self) -> None:
        """A device that cannot read the pinned buffer itself (the kernel checks its pointers before the launch,
        so nothing ran): copies, from now on."""
        if self._ops is input_fetch_reference:
            raise
        log.warning("the pinned input buffer is not readable from the device; copying it instead")
        self._ops = input_fetch_reference

    def sent(self) -> None:
        """Marks the copies just enqueued from the host buffer."""
        if self._copied is None:
            self._copied = torch.cuda.Event()
        self._copied.record()


_PAD = ("pad",)


def fill_block_tables(table: np.ndarray, held: list, page_lists: list[list[int]], bs: int) -> int:
    """Host block-table rows for a step's requests (row r: page_lists[r]; pad rows up to `bs`: page 0), kept
    from step to step; `held[r]` records what row r holds (its page list and their count; None: unknown). A row
    is rewritten only when that changed: a request's page list only ever grows in place (a request that gives
    its pages back gets a new list), so the same list at the same length holds the same pages. Returns the
    widest row's count. Entries past a row's count may be stale: attention reads a row's pages only up to its
    sequence length."""
    w = 1
    for r, pages in enumerate(page_lists):
        n = len(pages)
        if n > w:
            w = n
        h = held[r]
        if h is None or h[0] is not pages or h[1] != n:
            table[r, :n] = pages
            held[r] = (pages, n)
    for r in range(len(page_lists), bs):
        if held[r] is not _PAD:
            table[r, 0] = 0
            held[r] = _PAD
    return w


def fill_decode_rows(a: dict[str, np.ndarray], held: list, starts: list[int], slots: list[int],
                     page_lists: list[list[int]], page_size: int, bs: int, uses_kv: bool,
                     prev_rows: list[int] | None = None, tokens: list[int] | None = None) -> int:
    """The host side of a decode graph's inputs (DecodeGraphs' PackedInputs arrays `a`) for B rows padded to `bs`,
    by column: i64 rows 0-4 (token, position, state slot, KV slot, previous-step row), the sequence lengths and,
    with `uses_kv`, the block tables (fill_block_tables, `held`), each row's KV slot read from its table row by
    numpy rather than worked out row by row. `prev_rows` (an async step: its tokens are gathered on the device)
    or `tokens`. Pad rows: zeros, one token of context. Returns the widest table row's count (1 without
    `uses_kv`)."""
    a64, a32 = a["i64"], a["seq_lens"]
    B = len(starts)
    a64[1, :B] = starts
    pos = a64[1, :B]
    a64[2, :B] = slots
    np.add(pos, 1, out=a32[:B], casting="unsafe")
    a64[:, B:bs] = 0
    a32[B:bs] = 1
    if prev_rows is not None:
        a64[4, :B] = prev_rows
    else:
        a64[0, :B] = tokens
    if not uses_kv:
        a64[3, :B] = 0
        return 1
    tbl = a["block_tables"]
    w = fill_block_tables(tbl, held, page_lists, bs)
    kv = a64[3, :B]
    kv[:] = tbl[np.arange(B), pos // page_size]
    kv *= page_size
    kv += pos % page_size
    return w


class DecodeGraphs:
    """Decode-step graphs per padded batch size over persistent inputs. `run_chunks` fills them from the
    scheduled chunks through one pinned host buffer (PackedInputs): the five int64 rows (token, position, state
    slot, KV slot, previous-step row), the sequence lengths and the block tables' used columns come in through
    one kernel (with an async-scheduled step's tokens gathered from the previous step's on the device), so the
    step costs that kernel and one replay instead of a metadata build and a copy per field. A row's block table
    is rewritten on the host only when the row holds another request's pages or more of them than last time.
    Each graph also leaves each row's argmax beside the logits (`last_argmax`) for all-greedy batches."""

    def __init__(self, model, cache: CacheView, max_bs: int, max_blocks: int, sizes: list[int] | None = None):
        self.model, self.cache = model, cache
        self.max_bs, self.max_blocks = max_bs, max_blocks
        self.uses_kv = bool(cache.kv)
        dev = model.device
        self.inputs = PackedInputs(dev, {"i64": (torch.long, (5, max_bs)), "seq_lens": (torch.int32, (max_bs,)),
                                         "block_tables": (torch.int32, (max_bs, max_blocks))})
        self.i64, self.seq_lens, self.block_tables = (self.inputs.dev[k] for k in ("i64", "seq_lens",
                                                                                   "block_tables"))
        # prev_rows: in an async-scheduled step (engine/inflight.py), the row of the previous step's device
        # tokens each row takes as its input
        self.input_ids, self.positions, self.slot_ids, self.slot_mapping, self.prev_rows = self.i64.unbind(0)
        # an async step's gather (PackedInputs.send): into the tokens' row, from the previous-step rows' row
        self._token_rows = (self.inputs.element(self.input_ids), self.inputs.element(self.prev_rows))
        self.seq_lens.fill_(1)
        self.inputs.host["seq_lens"].fill_(1)
        self._held: list = [None] * max_bs   # what each host table row holds (fill_block_tables)
        self.cu_seqlens = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.rows = torch.arange(max_bs, dtype=torch.long, device=dev)
        self.sizes = sorted(sizes) if sizes else capture_sizes(max_bs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.argmax: dict[int, torch.Tensor] = {}
        self.last_argmax: torch.Tensor | None = None

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

    def run_chunks(self, chunks: list, page_size: int, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, V] of one-token chunks (engine/model_runner.py SeqChunk, each wanting logits): `run_rows`
        with each chunk's token, start, slot, pages and previous-step row."""
        return self.run_rows([c.start for c in chunks], [c.slot for c in chunks], [c.pages for c in chunks],
                             page_size, [c.prev_row for c in chunks] if prev_tokens is not None else None,
                             prev_tokens, [c.tokens[0] for c in chunks] if prev_tokens is None else None)

    @torch.inference_mode()
    def run_rows(self, starts: list[int], slots: list[int], page_lists: list[list[int]], page_size: int,
                 prev_rows: list[int] | None = None, prev_tokens: torch.Tensor | None = None,
                 tokens: list[int] | None = None) -> torch.Tensor:
        """Logits [B, V] of B decode rows: row r feeds one token at position starts[r] (its context so far) with
        state slot slots[r] and KV pages page_lists[r]; its token is tokens[r], or with `prev_tokens` (the
        previous step's tokens on the device) row prev_rows[r] of them, gathered on the device before the
        replay. Pad rows [B, bs) use slot 0, KV slot 0 and page 0 with one token of context. The host work is
        a few column writes, not a pass per row: the KV slots come from the host block table by numpy. A view
        of the graph's output, valid until the next replay."""
        B = len(starts)
        bs = self.padded_size(B)
        gather = table = None
        if prev_tokens is not None:
            assert prev_rows is not None and min(prev_rows) >= 0, \
                "an async-scheduled step takes every token from the last"
            gather = (*self._token_rows, B, prev_tokens)
        w = fill_decode_rows(self.inputs.arrays(), self._held, starts, slots, page_lists, page_size, bs,
                             self.uses_kv, prev_rows if prev_tokens is not None else None, tokens)
        if self.uses_kv:
            table = ("block_tables", bs, w)
        self.inputs.send(self.inputs.offsets["block_tables"], table, gather)
        self.inputs.sent()
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
# Sequences a prefill-graph step holds (prompt chunks and decode rows), one set of graphs per capacity: a step
# replays the smallest that fits it. Every unused sequence costs each recurrent prefill kernel idle programs,
# so a lone prompt keeps a graph of one (H100, Spartacus-1.4B, 128-token prompt: 2.32 ms replayed at capacity 1,
# 2.72 ms at 64; bench/results/prof_prefill-h100.json).
PREFILL_GRAPH_CAPACITIES = (1, 8, 64)


def prefill_capacities(max_num_seqs: int) -> tuple[int, ...]:
    """The prefill graphs' capacities for an engine of `max_num_seqs` concurrent requests."""
    return tuple(sorted({min(c, max(1, max_num_seqs)) for c in PREFILL_GRAPH_CAPACITIES}))


def prefill_buckets(max_chunk: int) -> tuple[int, ...]:
    """Token buckets for a scheduler chunking prompts at `max_chunk` tokens (at most
    PREFILL_GRAPH_MAX_TOKENS): powers of two from 32 to 512, then 1024, 2048, … + 16 up to the chunk size + 16
    (a bucket holds fewer tokens than its size, the rest being the pad sequence: a full 1024-token chunk
    fits 1040, not 2048)."""
    top = min(max_chunk, PREFILL_GRAPH_MAX_TOKENS)
    small = tuple(b for b in PREFILL_BUCKETS if b <= top)
    return small + tuple(b + 16 for b in (1024, 2048) if b < top) + (top + 16,)


class PrefillGraphs:
    """A step of up to max(capacities) sequences (prompt chunks, and decode rows beside them) holding fewer
    tokens than a bucket, as one graph replay per (capacity, token bucket): a forward of a few hundred small
    launches would otherwise cost ~10 ms of host time, every time prompts arrive together or while others
    decode. A step replays the smallest capacity that holds its sequences, then the smallest bucket.

    Layout of a replay with k sequences and T tokens at capacity S, bucket b: sequences [0, k) as scheduled;
    sequences [k, S) unused, with no tokens (their cu_seqlens entries repeat T, seq_len 0, state slot 0); then
    the pad sequence, tokens [T, b) on slot 0 at position 0 with one token of context, whose keys and values
    all land in slot 0 of page 0. Logit rows: one per sequence that wants them, in order, the rest read row
    0 and are left unread. A chunk that wants no logits (not its prompt's last) runs the same way.

    The inputs are filled through one pinned host buffer (PackedInputs, sized for the largest capacity; a
    smaller capacity uses the prefixes of its parts) and come in through one kernel: the token rows (ids,
    positions, KV slots), the per-sequence int64 rows (state slots, logit rows), the int32 rows (cu_seqlens,
    seq_lens) and the block tables' used columns."""

    def __init__(self, model, cache: CacheView, max_blocks: int, buckets: tuple[int, ...] = PREFILL_BUCKETS,
                 capacities: tuple[int, ...] = (1,)):
        self.model, self.cache, self.max_blocks = model, cache, max_blocks
        self.buckets = tuple(sorted(buckets))
        self.capacities = tuple(sorted({max(1, c) for c in capacities}))
        S = self.capacities[-1]
        self.page_size = cache.page_size
        self._width = 1          # block-table columns the last fill wrote
        self.wanted = 0
        dev = model.device
        self.inputs = PackedInputs(dev, {"i64": (torch.long, (3, self.buckets[-1])),
                                         "seq64": (torch.long, (2 * S + 1,)), "i32": (torch.int32, (2 * S + 3,)),
                                         "block_tables": (torch.int32, (S + 1, max_blocks))})
        self.i64, self.seq64, self.i32, self.block_tables = self.inputs.dev.values()
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}

    @staticmethod
    def _parts(S: int, seq64, i32, block_tables) -> tuple:
        """Capacity S's prefixes of the per-sequence buffers (device tensors or host arrays)."""
        return seq64[:2 * S + 1], i32[:2 * S + 3], block_tables[:S + 1]

    def _fill(self, chunks: list, key: tuple[int, int]) -> None:
        """Copies the step's inputs into the buffers of graph `key` = (capacity, bucket), through the packed
        inputs' host buffer."""
        S, bucket = key
        a64, s64, a32, abt = self.inputs.arrays().values()
        abt[:, :self._width] = 0           # the last fill's pages (its copy has been read: arrays() waited)
        self._width, self.wanted = fill_prefill_inputs(chunks, bucket, self.page_size, a64,
                                                       *self._parts(S, s64, a32, abt))
        # the token and per-sequence rows (a smaller capacity's graph reads only their prefixes) and the block
        # tables' used columns
        self.inputs.send(self.inputs.offsets["block_tables"],
                         ("block_tables", S + 1, self._width) if self.cache.kv else None)
        self.inputs.sent()

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for S in reversed(self.capacities):
            for bucket in reversed(self.buckets):
                # captured as a 1-token prompt on the pad slot / page 0
                key = (S, bucket)
                self._fill([_PadChunk()], key)
                meta = padded_prefill_meta(self.i64, *self._parts(S, self.seq64, self.i32, self.block_tables),
                                           bucket)
                self.graphs[key], self.outputs[key] = capture(lambda: self.model.forward(meta, self.cache),
                                                              pool, stream)
        torch.cuda.synchronize()
        log.info("captured prefill graphs for token buckets %s at capacities of %s sequences", self.buckets,
                 self.capacities)

    def bucket_for(self, chunks: list) -> tuple[int, int] | None:
        """The graph (capacity, token bucket) that runs these chunks (engine/model_runner.py SeqChunk), if any:
        at most max(capacities) of them, fewer tokens than a bucket, none taking its token from the previous
        step on the device."""
        if any(c.prev_row >= 0 or len(c.pages) > self.max_blocks for c in chunks):
            return None
        S = next((c for c in self.capacities if c >= len(chunks)), None)
        T = sum(len(c.tokens) for c in chunks)
        bucket = next((b for b in self.buckets if b > T), None)
        return (S, bucket) if chunks and S is not None and bucket is not None else None

    @torch.inference_mode()
    def run(self, chunks: list, key: tuple[int, int]) -> torch.Tensor:
        """Logits [N, V] of the N chunks that want them, in chunk order; a view of the graph's output buffer,
        valid until the next replay."""
        self._fill(chunks, key)
        self.graphs[key].replay()
        return self.outputs[key][:self.wanted]


class _PadChunk:
    """The capture's one sequence: a 1-token prompt on the pad slot with no pages."""
    tokens, start, pages, slot, want_logits, prev_row = [0], 0, [], 0, True, -1


def fill_prefill_inputs(chunks: list, bucket: int, page_size: int, a64: np.ndarray, s64: np.ndarray, a32: np.ndarray,
                        block_tables: np.ndarray) -> tuple[int, int]:
    """A prefill-graph step's inputs, laid out as PrefillGraphs describes, at capacity S = block_tables rows − 1:
    a64 [3, ≥ bucket] token ids / positions / KV slots, s64 [2·S + 1] state slots (S + 1) then logit rows (S),
    a32 [2·S + 3] cu_seqlens (S + 2) then seq_lens (S + 1), block_tables [S + 1, W] (zero on entry).
    Returns (block-table columns written, at least 1; logit rows wanted)."""
    S, P = block_tables.shape[0] - 1, page_size
    cu, lens = a32[:S + 2], a32[S + 2:]
    slots, rows = s64[:S + 1], s64[S + 1:]
    T = wanted = width = 0
    for i, c in enumerate(chunks):
        n = len(c.tokens)
        pos = np.arange(c.start, c.start + n)
        a64[0, T:T + n] = c.tokens
        a64[1, T:T + n] = pos
        if c.pages:
            pages = np.asarray(c.pages)
            a64[2, T:T + n] = pages[pos // P] * P + pos % P
            block_tables[i, :len(pages)] = pages
            width = max(width, len(pages))
        else:
            a64[2, T:T + n] = 0
        cu[i] = T
        T += n
        lens[i] = c.start + n
        slots[i] = c.slot
        if c.want_logits:
            rows[wanted] = T - 1
            wanted += 1
    k = len(chunks)
    a64[:, T:bucket] = 0
    cu[k:S + 1] = T
    cu[S + 1] = bucket
    lens[k:S] = 0
    lens[S] = 1
    slots[k:] = 0
    rows[wanted:] = 0
    return max(width, 1), wanted


def padded_prefill_meta(i64: torch.Tensor, seq64: torch.Tensor, i32: torch.Tensor, block_tables: torch.Tensor,
                        bucket: int) -> BatchMeta:
    """The BatchMeta over a prefill graph's buffers (fill_prefill_inputs' layout) for one token bucket."""
    S = block_tables.shape[0] - 1
    sizes = [bucket] + [1] * S     # host lists size grids only (the largest query and context); values unread
    return BatchMeta(
        input_ids=i64[0, :bucket], positions=i64[1, :bucket], cu_seqlens=i32[:S + 2], seq_lens=i32[S + 2:],
        block_tables=block_tables, slot_mapping=i64[2, :bucket], slot_ids=seq64[:S + 1],
        logits_indices=seq64[S + 1:], query_lens_cpu=sizes, seq_lens_cpu=sizes, is_decode=False,
    )
