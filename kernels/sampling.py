"""Token selection over a batch of logit rows [B, V] (fp32), the two steps every sampled decode step ends in:
the row argmax (greedy), and the exponential race — argmax_i(l_i·s − log E_i) with E_i ~ Exp(1) independent,
which draws i with probability softmax(l·s)_i (the same law as argmax(p_i / E_i), engine/sampler.py), so no
softmax, division or normalisation is needed; tokens masked to −inf never win. And the truncation the
sampler graphs apply before the race, as one per-row floor on the scaled logits (`truncation_floor`), and the
truncated draw itself (`race_truncated`: the floor, then the race; the Triton file draws the same law by
acceptance).

`race` draws its noise from the counter-based stream keyed by `seed` (an int64 device tensor, so a CUDA
graph reads the value current at replay): the same seed gives the same draws. Here (the reference), the
stream is torch's generator seeded from it; the Triton kernels use philox: both are exact draws of the same
law, not the same numbers.
"""
from __future__ import annotations

import torch


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """[B] int64: each row's first maximal index (torch.argmax's tie rule)."""
    return logits.argmax(-1)


def race(logits: torch.Tensor, scale: torch.Tensor, seed: torch.Tensor,
         floor: torch.Tensor | None = None) -> torch.Tensor:
    """[B] int64 drawn from softmax(logits · scale[:, None]) per row; scale [B] fp32 (1 / temperature).
    floor [B] (optional): tokens whose scaled logit is below their row's floor are out (truncation)."""
    g = torch.Generator(device=logits.device)
    g.manual_seed(int(seed.item()))
    u = torch.rand(logits.shape, generator=g, device=logits.device).clamp_min_(torch.finfo(torch.float32).tiny)
    x = logits.float() * scale[:, None]
    if floor is not None:
        x = x.masked_fill(x < floor[:, None], float("-inf"))
    return (x - (-u.log()).log()).argmax(-1)


def truncation_floor(x: torch.Tensor, min_p: torch.Tensor, top_k: torch.Tensor | None,
                     top_p: torch.Tensor) -> torch.Tensor:
    """Per row of x [B, V] (temperature applied), the lowest logit `apply_truncation` (engine/sampler.py)
    keeps, so that keeping x >= floor is that truncation (min_p, then top_k, then top_p over the survivors) up
    to exact ties at the top_p cut, where every tied token stays. Knobs per row, neutral when unused: min_p [B]
    0, top_k [B] int64 V (or None: no row cuts by rank), top_p [B] 1. Here one sort of each row, the top_p
    cut computed as apply_truncation computes it (ascending cumulative mass), so rounding agrees."""
    asc = x.sort(-1).values
    V = x.shape[-1]
    top = asc[:, -1:]
    floor = top + min_p[:, None].log()
    if top_k is not None:
        floor = torch.maximum(floor, asc.gather(1, (V - top_k).unsqueeze(1)))
    probs = asc.masked_fill(asc < floor, float("-inf")).softmax(-1)
    dropped = (probs.cumsum(-1) <= 1.0 - top_p[:, None]).sum(-1, keepdim=True).clamp_(max=V - 1)
    return torch.maximum(floor, asc.gather(1, dropped)).squeeze(1)


def race_truncated(logits: torch.Tensor, scale: torch.Tensor, min_p: torch.Tensor, top_k: torch.Tensor | None,
                   top_p: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """[B] int64 drawn from softmax(x) truncated as `truncation_floor` truncates (knobs as there), x = logits ·
    scale[:, None]: the sampler graphs' draw for rows that cut. Here the floor, then the race."""
    x = logits.float() * scale[:, None]
    return race(x, torch.ones_like(scale), seed, truncation_floor(x, min_p, top_k, top_p))
