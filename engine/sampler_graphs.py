"""The sampler of a decode step as CUDA graphs: temperature, then (when a row asks) min_p / top_k / top_p, then
the exponential-race draw, for each padded batch size of the decode graphs, reading their logits and argmax
buffers in place. An eager sampled step is ~15 launches and host work per step (engine/sampler.py); replayed,
it is three small copies and one launch.

The graphs truncate as the eager sampler's `apply_truncation` does, as one per-row floor on the logits
(`truncation_floor`; on the GPU a threshold search without a sort, kernels/sampling_triton.py) with every knob
present: an unused knob holds its neutral value (top_k = vocabulary, top_p = 1, min_p = 0), which cuts
nothing, so a row's distribution is the one the eager sampler draws from (up to exact ties and rounding at the
top_p cut). The draw is the same exponential race, in logit space with split-row kernels (no softmax, one pass
over each row). Three graphs per size: no truncation; min_p / top_p; and with top_k too (its search comes
first). A cut is drawn by acceptance (`race_truncated`): a first race is kept where the cut keeps its winner,
and only the other rows search for their top_p floor and race again. The noise stream's seed lives on the
device and each replay advances it; rows with their own seeded
generator, penalties, a min_tokens ban or logprobs make the batch take the eager sampler (engine/sampler.py
decides).
"""
from __future__ import annotations

import logging

import torch

from hybridserve.engine.cuda_graphs import PackedInputs, capture
from hybridserve.engine.request import SamplingParams
from hybridserve.kernels.backend import pick

log = logging.getLogger("hybridserve.engine")

# Larger batches sample eagerly. Each size's graphs hold a [B, V] fp32 buffer in the graph pool (256 rows of a
# 152k vocabulary: 155 MB); the eager sampler at 128 rows took 3.5-6.3 ms a step on an H100 where the decode graph
# took 0.7-1.3 (bench/results/engine_decode_host_path-h100.json).
MAX_BATCH = 256


CUTS = ("", "p", "kp")      # no truncation; min_p / top_p; min_p / top_k / top_p


def _draw(logits, argmax, temperature, top_k, top_p, min_p, greedy, seed, cut: str, ops=None):
    """The exponential race (kernels/sampling.py) over the temperature-scaled logits, truncated first when
    asked (`cut`, one of CUTS); greedy rows take the decode graph's argmax. Each replay advances the seed.
    A cut draws by `race_truncated` (on the GPU a first race is kept where the cut keeps its winner; only the
    other rows search for the top_p floor). `ops`: the kernels (default: kernels/backend.py's pick)."""
    ops = ops or pick("sampling", logits.device)
    seed.add_(1)
    if cut:
        ids = ops.race_truncated(logits, 1.0 / temperature, min_p, top_k if "k" in cut else None, top_p, seed)
    else:
        ids = ops.race(logits, 1.0 / temperature, seed)
    return torch.where(greedy != 0, argmax, ids)


class SamplerGraphs:
    def __init__(self, decode_graphs):
        self.decode = decode_graphs
        self.sizes = [s for s in decode_graphs.sizes if s <= MAX_BATCH]
        n = decode_graphs.max_bs
        dev = decode_graphs.model.device
        self.vocab = None
        # temperature, top_p, min_p; top_k, greedy (0 / 1): one buffer, one copy a step
        self.inputs = PackedInputs(dev, {"i64": (torch.long, (2, n)), "f32": (torch.float32, (3, n))})
        self.f32, self.i64 = self.inputs.dev["f32"], self.inputs.dev["i64"]
        self.f32.fill_(1.0)
        # the race's noise stream: seeded from the global generator (a served run follows --seed)
        self.seed = torch.randint(1 << 31, (1,), dtype=torch.long).to(dev)
        self.graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, str], torch.Tensor] = {}

    def _args(self, bs: int):
        temperature, top_p, min_p = self.f32[:, :bs]
        return (self.decode.outputs[bs], self.decode.argmax[bs], temperature, self.i64[0, :bs], top_p, min_p,
                self.i64[1, :bs], self.seed)

    @torch.inference_mode()
    def capture(self) -> None:
        if not self.sizes:
            return
        self.vocab = self.decode.outputs[self.sizes[0]].shape[-1]
        self.i64[0].fill_(self.vocab)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for bs in reversed(self.sizes):
            for cut in CUTS:
                args = self._args(bs)
                self.graphs[bs, cut], self.outputs[bs, cut] = capture(lambda: _draw(*args, cut), pool, stream)
        torch.cuda.synchronize()
        log.info("captured sampler graphs for batch sizes %s", self.sizes)

    def covers(self, batch: int) -> bool:
        bs = self.decode.padded_size(batch)
        return bs is not None and bs in self.sizes

    @torch.inference_mode()
    def run(self, params: list[SamplingParams]) -> torch.Tensor:
        """Token ids [B] on the device for the rows of the decode graph replayed last (eligible params)."""
        B = len(params)
        bs = self.decode.padded_size(B)
        a = self.inputs.arrays()
        a32, a64 = a["f32"], a["i64"]
        V = self.vocab
        top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
        a32[0, :B] = [1.0 if p.greedy else p.temperature for p in params]
        a32[1, :B] = [min(p.top_p, 1.0) for p in params]
        a32[2, :B] = [max(p.min_p, 0.0) for p in params]
        a64[0, :B] = top_k
        a64[1, :B] = [p.greedy for p in params]
        a32[:2, B:bs] = 1.0         # pad rows: greedy, nothing cut
        a32[2, B:bs] = 0.0
        a64[0, B:bs] = V
        a64[1, B:bs] = 1
        self.inputs.send()
        self.inputs.sent()
        by_rank = any(k != V for k in top_k)
        by_mass = any(p.top_p < 1.0 or p.min_p > 0.0 for p in params)
        cut = "kp" if by_rank else "p" if by_mass else ""
        self.graphs[bs, cut].replay()
        return self.outputs[bs, cut][:B]
