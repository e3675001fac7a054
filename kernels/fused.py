"""Per-layer glue in plain PyTorch (RMSNorm, SiLU·mul, RoPE, the residual add + norm + projection
chain, Spartacus's monoid inputs, RoPE + KV-page write): the reference for kernels/fused_triton.py,
which does each in one kernel (or, for the projections at batch 1, inside one GEMV) instead of several."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 and cast back to the input dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for gate_up = [g | u] along the last dim."""
    g, u = gate_up.chunk(2, dim=-1)
    return F.silu(g) * u


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first cos.shape[-1] dims of x [T, H, D]; the rest pass through."""
    rot = cos.shape[-1]
    xr, xp = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    out = xr * cos[:, None, :] + rotated * sin[:, None, :]
    return torch.cat([out, xp], dim=-1) if xp.shape[-1] else out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, RMSNorm(h)) for h = residual + x: the residual stream and the next sublayer's input."""
    h = residual + x
    return h, rms_norm(h, weight, eps)


def linear(x: torch.Tensor, weight: torch.Tensor, side: bool = False, after_block: bool = False) -> torch.Tensor:
    """weight · x (F.linear): a sublayer's output projection, whose residual add goes with the next norm.
    `side`: a product off the step's critical path (a side stream); `after_block`: one whose input comes from a
    latency-bound block (the attention); the GPU version may run either differently."""
    return F.linear(x, weight)


def gather_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a [L, R] table ([T, R]), or of each of a [G, L, R] stack of tables ([G, T, R]): a step's
    token embeddings, its positions' cos/sin rows."""
    return table.index_select(-2, ids)


def add_norm_linear(h: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, weight: torch.Tensor,
                    eps: float, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h', weight · RMSNorm(h')) for h' = h + delta (h when delta is None): the residual add, the next
    sublayer's input norm and its first projection (out_dtype: the projection cast after). A delta in another
    dtype than h (fp32 sums: kernels/attention_o.py) is rounded to h's first, as a matmul would store it."""
    if delta is not None:
        h = h + delta.to(h.dtype)
    y = F.linear(rms_norm(h, norm_weight, eps), weight)
    return h, y if out_dtype is None else y.to(out_dtype)


def add_norm_linear_rope_kv(h: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor,
                            weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                            k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                            q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                            prefetch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention sublayer's input side: `add_norm_linear` into its q|k|v weight, then `rope_write_kv`
    (QK-norm, RoPE, the k/v written at slot_mapping). Returns (h', q [T, H, D] normed and rotated).
    `prefetch`: a weight, or (weight, the weight after it), that the Triton file may ask into L2 meanwhile
    (kernels/l2_prefetch.py `plan`); a hint, unused here."""
    h, qkv = add_norm_linear(h, delta, norm_weight, weight, eps)
    q = rope_write_kv(qkv.view(h.shape[0], -1, k_cache.shape[-1]), cos, sin, num_heads, k_cache, v_cache,
                      slot_mapping, q_norm, k_norm, eps)
    return h, q[:, :num_heads]


def add_norm_linear_silu_mul(h: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor,
                             gate_up: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_norm_linear` into a stacked [gate; up] weight, then silu(g)·u: the first half of a SwiGLU MLP."""
    h, gu = add_norm_linear(h, delta, norm_weight, gate_up, eps)
    return h, silu_mul(gu)


def _head_rms_norm(x: torch.Tensor, weight: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """RMSNorm of x [T, H·d] (fp32 out) per head ([d] weight) or over the full width ([H·d] weight)."""
    T, W = x.shape
    xf = x.float().view(T, heads, W // heads) if weight.numel() * heads == W else x.float().view(T, 1, W)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float().view(-1, xf.shape[-1])).view(T, heads, W // heads)


def monoid_prep(qkvz: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor, decay_bias: torch.Tensor | None,
                num_heads: int, head_dim: int, eps: float, decay_gate: str):
    """Spartacus's glue between the fused [q | k | v | z] projection and the monoid kernel.

    q = RMSNorm(q)·w_q (w_q already carries the d^-1/2 scale), k = SiLU(RMSNorm(k)·w_k) (the norm rounded
    to the input dtype first, as the unfused path stores it: bf16 logits move ~1e-2 otherwise), each norm per
    head ([d] weight) or over the full width ([H·d] weight); log α = log σ(z + b), or −softplus(z + b)
    for "neg_softplus", in fp32 and widened to [T, H, d] when the gate is per head ("scalar_sigmoid").
    Returns q, k [T, H, d] in the input dtype, v [T, H, d] (a view of qkvz) and log_a [T, H, d] fp32.
    """
    T = qkvz.shape[0]
    W = num_heads * head_dim
    q, k, v, z = qkvz.split([W, W, W, qkvz.shape[1] - 3 * W], dim=-1)
    q = _head_rms_norm(q, q_norm, num_heads, eps).to(qkvz.dtype)
    k = F.silu(_head_rms_norm(k, k_norm, num_heads, eps).to(qkvz.dtype))
    z = z.float().view(T, num_heads, -1)
    if decay_bias is not None:
        z = z + decay_bias.float().view(num_heads, -1)
    log_a = -F.softplus(z) if decay_gate == "neg_softplus" else F.logsigmoid(z)
    return q, k, v.view(T, num_heads, head_dim), log_a.expand(T, num_heads, head_dim).contiguous()


def rope_write_kv(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor, q_norm: torch.Tensor | None = None,
                  k_norm: torch.Tensor | None = None, eps: float = 1e-5,
                  prefetch=None) -> torch.Tensor:
    """RoPE on the q and k heads of packed projections x [T, H + 2·Hkv, D] (q | k | v heads), and the
    rotated k and the v of the first len(slot_mapping) rows written to their flat positions of the paged
    caches [pages, page_size, Hkv, D] (the rows after them, if any, are not cached). q_norm / k_norm ([D]
    weights): QK-norm, a per-head RMSNorm of q / k rounded to the input dtype before the rotation.
    Returns the rotated q and k heads [T, H + Hkv, D]. `prefetch`: as in `add_norm_linear_rope_kv`."""
    hkv = (x.shape[1] - num_heads) // 2
    qk = x[:, :num_heads + hkv]
    if q_norm is not None or k_norm is not None:
        q, k = qk[:, :num_heads], qk[:, num_heads:]
        qk = torch.cat([q if q_norm is None else rms_norm(q, q_norm, eps),
                        k if k_norm is None else rms_norm(k, k_norm, eps)], dim=1)
    qk = rope(qk, cos, sin)
    n = slot_mapping.shape[0]
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = qk[:n, num_heads:].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = x[:n, num_heads + hkv:].to(v_cache.dtype)
    return qk
