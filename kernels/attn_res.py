"""Block Attention Residual routing (specs/kotodama.md §7.1), plain PyTorch reference for
kernels/attn_res_triton.py: softmax over depth of q·RMSNorm_w(src), mixing the raw sources, in fp32;
`route_add` also does the sublayer's residual add into the partial before it."""
from __future__ import annotations

import torch

MAX_SOURCES = 8


def route(sources: list[torch.Tensor], query: torch.Tensor, norm_w: torch.Tensor, eps: float) -> torch.Tensor:
    if len(sources) == 1:
        return sources[0]
    qw = query.float() * norm_w.float()
    src = torch.stack([s.float() for s in sources])                     # [S, T, D]
    r = torch.rsqrt(src.pow(2).mean(-1) + eps)                          # [S, T]
    alpha = torch.softmax(r * (src @ qw), dim=0)                        # [S, T]
    return (alpha[..., None] * src).sum(0).to(sources[0].dtype)


def route_add(sources: list[torch.Tensor], delta: torch.Tensor, query: torch.Tensor, norm_w: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add into the running partial (the last source) and the routing after it:
    (partial + delta stored in the partial's dtype, route over the sources with that new partial)."""
    partial = sources[-1] + delta
    return partial, route(sources[:-1] + [partial], query, norm_w, eps)
