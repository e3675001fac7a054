"""A decode step's attention sublayer after its q|k|v projection, through the o projection: QK-norm and RoPE,
the step's k/v written to their pages, attention over each sequence's pages (plus one extra key/value per
query when `entry` is given, NanoHammer's state entry), then the o projection. Plain reference: the three
steps as the unfused path runs them (kernels/fused.py `rope_write_kv`, kernels/paged_attention.py `decode`,
a matmul). The Triton file does it in one kernel, each program one (sequence, kv head) and a run of the o
projection's rows, and adds its partial products into an fp32 output; the model's next kernel rounds that
to the residual's dtype before the residual add, as the matmul would have stored it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridserve.kernels.fused import rope_write_kv
from hybridserve.kernels.paged_attention import decode as paged_decode


def decode(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, k_cache: torch.Tensor,
           v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
           scale: float, o_weight: torch.Tensor, out: torch.Tensor, q_norm: torch.Tensor | None = None,
           k_norm: torch.Tensor | None = None, eps: float = 1e-5,
           entry: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """qkv [B, H + 2·Hkv, D] (one token per sequence, whose slot is its block table's key seq_lens[b] − 1) → the
    o projection [B, N]: added into `out` (fp32 [B, N], zeros on entry) and returned. Here the projection is
    rounded to the weight's dtype first, as the matmul stores it."""
    qk = rope_write_kv(qkv, cos, sin, num_heads, k_cache, v_cache, slot_mapping, q_norm, k_norm, eps)
    return decode_merged(qk[:, :num_heads], k_cache, v_cache, block_tables, seq_lens, scale, o_weight, out, entry)


def decode_merged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, scale: float, o_weight: torch.Tensor, out: torch.Tensor,
                  entry: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The same from the rotated q [B, H, D], the step's k/v already in the cache: the attention, then the o
    projection added into `out`. The Triton file runs the attention's split kernel as the unfused path does,
    then one kernel that merges each kv head's splits and applies its slice of the o weight."""
    o = paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, entry=entry)
    out += F.linear(o.reshape(o.shape[0], -1), o_weight).float()
    return out
