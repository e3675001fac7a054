"""Turns a scheduled batch into model inputs (packed tokens, block tables, slot ids) and runs the model."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridserve.engine.cache_pools import CachePools
from hybridserve.engine.cuda_graphs import DecodeGraphs, PrefillGraphs, prefill_buckets, prefill_capacities
from hybridserve.engine.sampler_graphs import SamplerGraphs
from hybridserve.models.batch import BatchMeta


MIXED_GRAPHS = True     # a mixed step may run as a decode-graph + prefill-graph pair (False: not, for A/B)


@dataclass
class SeqChunk:
    """What one sequence feeds a forward: tokens [start, start + len(tokens)) of its context."""

    tokens: list[int]
    start: int
    pages: list[int]
    slot: int
    want_logits: bool
    prev_row: int = -1         # async scheduling: the one token is row prev_row of the previous step's device
                               # tokens (ModelRunner.run's prev_tokens); `tokens` then holds a placeholder


def build_meta(chunks: list[SeqChunk], page_size: int, device: torch.device,
               all_logits: bool = False) -> BatchMeta:
    ids, pos, slot_map, cu, seq_lens, qlens, logits_idx = [], [], [], [0], [], [], []
    max_pages = max((len(c.pages) for c in chunks), default=0) or 1
    tables = []
    for c in chunks:
        n = len(c.tokens)
        first = len(ids)
        ids.extend(c.tokens)
        p = range(c.start, c.start + n)
        pos.extend(p)
        if c.pages:
            slot_map.extend(c.pages[t // page_size] * page_size + t % page_size for t in p)
        else:
            slot_map.extend([0] * n)
        tables.append(c.pages + [0] * (max_pages - len(c.pages)))
        cu.append(len(ids))
        seq_lens.append(c.start + n)
        qlens.append(n)
        if all_logits:
            logits_idx.extend(range(first, first + n))
        elif c.want_logits:
            logits_idx.append(first + n - 1)

    # one host-to-device copy per step: every index list packed into a single int64 tensor, then split. Each
    # part is padded to an even length, so every view starts 16-byte aligned: Triton compiles a kernel variant
    # per pointer alignment, and an odd token count would otherwise give the views after it variants of their
    # own, compiled (a second or more) in the middle of serving
    parts = [ids, pos, slot_map, [c.slot for c in chunks], logits_idx, cu, seq_lens,
             [p for row in tables for p in row]]
    sizes = [len(p) + len(p) % 2 for p in parts]
    flat = [v for part, size in zip(parts, sizes) for v in (*part, *[0] * (size - len(part)))]
    packed = torch.tensor(flat, dtype=torch.long).to(device, non_blocking=True)
    ids_t, pos_t, slot_map_t, slots_t, logits_t, cu_t, lens_t, tables_t = (
        view[:len(part)] for view, part in zip(packed.split(sizes), parts))
    return BatchMeta(
        input_ids=ids_t, positions=pos_t, cu_seqlens=cu_t.int(), seq_lens=lens_t.int(),
        block_tables=tables_t.view(len(chunks), max_pages).int(), slot_mapping=slot_map_t, slot_ids=slots_t,
        logits_indices=logits_t, query_lens_cpu=qlens, seq_lens_cpu=seq_lens,
        is_decode=all(q == 1 for q in qlens),
    )


class ModelRunner:
    """CUDA-graph replay on GPU for decode steps (and their sampling) and for steps of prompt chunks (with any
    decode rows beside them) of fewer than `max_chunk_tokens` + 16 tokens in all (the scheduler's chunk size;
    at most PREFILL_GRAPH_MAX_TOKENS) and at most max(PREFILL_GRAPH_CAPACITIES) sequences: one prefill-graph replay,
    or the decode graph for the rows and a prefill graph for the chunks where the rows would move the step
    to a larger token bucket; eager otherwise."""

    def __init__(self, model, pools: CachePools, max_model_len: int, max_num_seqs: int,
                 enforce_eager: bool = False, max_chunk_tokens: int = 512):
        self.model, self.pools = model, pools
        self.device = model.device
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.sampler_graphs: SamplerGraphs | None = None
        if self.device.type == "cuda" and not enforce_eager:
            max_blocks = -(-max_model_len // pools.page_size)
            self.graphs = DecodeGraphs(model, pools.view, max(1, max_num_seqs), max_blocks)
            self.graphs.capture()
            self.prefill_graphs = PrefillGraphs(model, pools.view, max_blocks, prefill_buckets(max_chunk_tokens),
                                                prefill_capacities(max_num_seqs))
            self.prefill_graphs.capture()
            self.sampler_graphs = SamplerGraphs(self.graphs)
            self.sampler_graphs.capture()
        self.last_argmax: torch.Tensor | None = None

    def graph_sampler(self, num_rows: int) -> SamplerGraphs | None:
        """The sampler graphs for the decode-graph step just run, if they cover its batch size."""
        if self.last_argmax is None or self.sampler_graphs is None or not self.sampler_graphs.covers(num_rows):
            return None
        return self.sampler_graphs

    @torch.inference_mode()
    def run(self, chunks: list[SeqChunk], all_logits: bool = False,
            prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the chunks that want them, in chunk order. After a decode-graph step `last_argmax`
        holds each row's argmax on the device (None after other steps). `prev_tokens`: the previous step's
        tokens on the device, which one-token chunks with a `prev_row` take as their input (async scheduling:
        nothing is read back to the host in between)."""
        self.last_argmax = None
        if self.graphs is not None and not all_logits:
            others = [i for i, c in enumerate(chunks) if len(c.tokens) != 1 or not c.want_logits]   # not decode rows
            if not others and self.graphs.padded_size(len(chunks)) is not None:
                logits = self.graphs.run_chunks(chunks, self.pools.page_size, prev_tokens)
                self.last_argmax = self.graphs.last_argmax
                return logits
            if prev_tokens is None:
                logits = self._run_prefill_graphs(chunks, others)
                if logits is not None:
                    return logits
        meta = build_meta(chunks, self.pools.page_size, self.device, all_logits)
        if prev_tokens is not None:
            meta.input_ids = take_previous(prev_tokens, [c.prev_row for c in chunks], meta.input_ids.device)
        return self.model.forward(meta, self.pools.view)

    @torch.inference_mode()
    def run_next(self, starts: list[int], slots: list[int], page_lists: list[list[int]], prev_rows: list[int],
                 prev_tokens: torch.Tensor) -> torch.Tensor:
        """An async-scheduled decode step (engine/inflight.py) given as columns: row r continues at position
        starts[r] with slot slots[r] and pages page_lists[r], its token row prev_rows[r] of `prev_tokens`. The
        decode graph takes the columns as they are (no SeqChunk per row); eager runs build the chunks."""
        graphs = self.graphs
        if graphs is not None and graphs.padded_size(len(starts)) is not None:
            logits = graphs.run_rows(starts, slots, page_lists, self.pools.page_size, prev_rows, prev_tokens)
            self.last_argmax = graphs.last_argmax
            return logits
        return self.run([SeqChunk([0], st, pg, sl, True, r)
                         for st, sl, pg, r in zip(starts, slots, page_lists, prev_rows)], prev_tokens=prev_tokens)

    def _run_prefill_graphs(self, chunks: list[SeqChunk], others: list[int]) -> torch.Tensor | None:
        """A step with prompt chunks (`others`: their indices) as graph replays, None if it fits none. The
        whole step is one prefill-graph replay, unless its decode rows would move it to a larger token bucket
        than the chunks alone take: then the decode graph runs the rows and a prefill graph the chunks (the
        two touch disjoint slots and pages, so their order does not matter). Logit rows in chunk order."""
        pg = self.prefill_graphs
        whole = pg.bucket_for(chunks)
        num_rows = len(chunks) - len(others)
        if MIXED_GRAPHS and num_rows and self.graphs.padded_size(num_rows) is not None:
            prompts = [chunks[i] for i in others]
            part = pg.bucket_for(prompts)
            if part is not None and (whole is None or part[1] < whole[1]):
                skip = set(others)
                prompt = pg.run(prompts, part)
                decoded = self.graphs.run_chunks([c for i, c in enumerate(chunks) if i not in skip],
                                                 self.pools.page_size)
                # logit rows in chunk order: decode rows from the first part, wanting prompt chunks from the second
                order, row, chunk_row = [], 0, num_rows
                for i, c in enumerate(chunks):
                    if i not in skip:
                        order.append(row)
                        row += 1
                    elif c.want_logits:
                        order.append(chunk_row)
                        chunk_row += 1
                both = torch.cat([decoded, prompt])
                return both if order == list(range(len(order))) else both[torch.tensor(order, device=both.device)]
        return pg.run(chunks, whole) if whole is not None else None


def take_previous(prev_tokens: torch.Tensor, rows: list[int], device: torch.device) -> torch.Tensor:
    """The input ids of an async-scheduled step run eagerly: row `rows[i]` of `prev_tokens`, gathered on the
    device (every chunk of such a step is one token taken from the last step, as in DecodeGraphs.run_chunks)."""
    assert min(rows) >= 0, "an async-scheduled step takes every token from the last"
    return prev_tokens.index_select(0, torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True))
