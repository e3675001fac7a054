"""Causal depthwise conv (kernel K) + SiLU that carries a window of the last K−1 pre-conv inputs.

y_t[c] = silu(Σ_j W[c, j] · u_{t−K+1+j}[c]); W[c, K−1] multiplies the current token, and inputs before the
first token come from the window (zero for a new request). The window [C, K−1] is kept in the model dtype,
oldest column first, so a sequence continues exactly across chunks and decode steps
(specs/gated_deltanet.md §6 step 2, §7). Arithmetic is fp32; y comes back in x's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reference(x: torch.Tensor, weight: torch.Tensor, initial_window: torch.Tensor | None = None):
    """x [T, C], weight [C, K], initial_window [C, K−1] or None (zeros) → (y [T, C], window [C, K−1])."""
    T, C = x.shape
    K = weight.shape[1]
    window = (torch.zeros(C, K - 1, dtype=x.dtype, device=x.device) if initial_window is None
              else initial_window.to(x.dtype))
    full = torch.cat([window.t(), x], dim=0).float()                           # [K−1+T, C]
    taps = full.unfold(0, K, 1)                                                # [T, C, K]
    y = F.silu((taps * weight.float()).sum(-1))
    return y.to(x.dtype), full[T:].t().to(x.dtype)


def varlen_prefill(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor, conv_pool: torch.Tensor,
                   slot_ids: torch.Tensor) -> torch.Tensor:
    """Packed varlen batch: each sequence starts from conv_pool[slot_ids[b]] and leaves its last K−1
    inputs there (a chunk shorter than K−1 shifts in behind the older part of the window)."""
    y = torch.empty_like(x)
    bounds = cu_seqlens.tolist()
    for b, slot in enumerate(slot_ids.tolist()):
        s, e = bounds[b], bounds[b + 1]
        if e == s:
            continue
        y[s:e], conv_pool[slot] = reference(x[s:e], weight, conv_pool[slot])
    return y


def decode_step(x: torch.Tensor, weight: torch.Tensor, conv_pool: torch.Tensor,
                slot_ids: torch.Tensor) -> torch.Tensor:
    """One token per sequence, x [B, C]; updates conv_pool[slot_ids] in place. Pad rows use slot 0."""
    full = torch.cat([conv_pool[slot_ids], x.to(conv_pool.dtype)[:, :, None]], dim=-1)  # [B, C, K]
    conv_pool[slot_ids] = full[:, :, 1:]
    return F.silu((full.float() * weight.float()).sum(-1)).to(x.dtype)
