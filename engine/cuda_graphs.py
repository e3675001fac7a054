"""CUDA-graph decode: the whole decode step (all layers, final norm, LM head) captured once per padded
batch size and replayed with persistent input buffers.

Pad rows point at state slot 0 and KV page 0 (both reserved), so replaying a padded graph never touches
a live request. Prefill and mixed steps run eagerly.
"""
from __future__ import annotations

import logging

import torch

from hybridserve.models.batch import BatchMeta
from hybridserve.models.cache import CacheView

log = logging.getLogger("hybridserve.engine")


def capture_sizes(max_bs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4) if s <= max_bs] + list(range(8, max_bs + 1, 8))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


class DecodeGraphs:
    def __init__(self, model, cache: CacheView, max_bs: int, max_blocks: int, sizes: list[int] | None = None):
        self.model, self.cache = model, cache
        self.max_bs, self.max_blocks = max_bs, max_blocks
        dev = model.device
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.slot_ids = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.slot_mapping = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=dev)
        self.cu_seqlens = torch.arange(max_bs + 1, dtype=torch.int32, device=dev)
        self.rows = torch.arange(max_bs, dtype=torch.long, device=dev)
        self.sizes = sorted(sizes) if sizes else capture_sizes(max_bs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

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
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.model.forward(meta, self.cache)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.outputs[bs] = self.model.forward(meta, self.cache)
            self.graphs[bs] = g
        torch.cuda.synchronize()
        log.info("captured decode graphs for batch sizes %s", self.sizes)

    def padded_size(self, batch: int) -> int | None:
        return next((s for s in self.sizes if s >= batch), None)

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
        return self.outputs[bs][:B]
