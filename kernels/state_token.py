"""NanoHammer's integral state path and the per-query state entry (specs/nanohammer.md §1, §7.2–7.3).

The only per-request state is I, a running sum of position-rotated ("holographic") token vectors:
u_t = HoloRoPE(w_t, t), I_t = I_{t-1} + u_t. Rotating by e^{iθ_j t} before summing and by e^{-iθ_j t}
after reading makes the readout a relative-position summary, so the absolute position counter needs no
storage beyond the request's own position.

`integral_reference` is the plain sequential definition; `varlen_integral` (packed prefill chunks) and
`decode_integral` (one token per sequence) start from and write back state_pool[slot_ids[b]] in place.
Slot 0 is the pad slot: padding rows read and write only there.

A layer's state entry (projection, input norm, k/v projection, RoPE) is folded into one GEMV and an
epilogue (`fold_entry_weights`, `folded_entry`): the engine builds it on a side stream beside the
backbone, where the unfolded chain's weight reads (~4× the fold's at full size) take bandwidth from the
main layers.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from hybridserve.kernels.fused import rms_norm, rope
from hybridserve.kernels.paged_attention import entry_logit as state_logit  # noqa: F401  (the state entry's)

HOLO_BASE = 10000.0


def holo_theta(dim: int, base: float = HOLO_BASE, device: torch.device | str | None = None) -> torch.Tensor:
    """θ_j = base^(−2j/dim), j = 0 … dim/2 − 1, in fp64."""
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)


def _holo_rotate(x: torch.Tensor, positions: torch.Tensor, theta: torch.Tensor, sign: float) -> torch.Tensor:
    """Multiply each complex pair (x_{2j}, x_{2j+1}) by e^{sign·iθ_j t}.

    Angles reach ~1.3e5 rad at t ≈ 131K; fp32 angle arithmetic would lose ~1e-2 rad there, so they are
    formed and range-reduced in fp64 before cos/sin (§7.2 numerics).
    """
    ang = torch.remainder(positions.to(torch.float64)[:, None] * theta[None, :], 2 * math.pi)
    cos, sin = ang.cos().to(x.dtype), (sign * ang.sin()).to(x.dtype)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def holo_rope(x: torch.Tensor, positions: torch.Tensor, base: float = HOLO_BASE) -> torch.Tensor:
    """HoloRoPE(x [T, S], t [T]): rotate pair j by e^{iθ_j t}."""
    return _holo_rotate(x, positions, holo_theta(x.shape[-1], base, x.device), 1.0)


def holo_rope_inv(x: torch.Tensor, positions: torch.Tensor, base: float = HOLO_BASE) -> torch.Tensor:
    """HoloRoPE^{-1}(x [T, S], t [T]): rotate pair j by e^{−iθ_j t}."""
    return _holo_rotate(x, positions, holo_theta(x.shape[-1], base, x.device), -1.0)


def integral_reference(u: torch.Tensor, initial: torch.Tensor | None = None) -> torch.Tensor:
    """I_t = I_{t-1} + u_t for one sequence u [T, S], from `initial` (zero when None); fp32 loop."""
    acc = torch.zeros(u.shape[-1], dtype=torch.float32, device=u.device) if initial is None else initial.float()
    out = torch.empty(u.shape, dtype=torch.float32, device=u.device)
    for t in range(u.shape[0]):
        acc = acc + u[t].float()
        out[t] = acc
    return out


def varlen_integral(u: torch.Tensor, cu_seqlens: torch.Tensor, state_pool: torch.Tensor,
                    slot_ids: torch.Tensor) -> torch.Tensor:
    """Per-sequence cumulative sum of packed u [T, S] plus each sequence's carried I; returns I [T, S] fp32.

    One cumsum over the whole packed batch, in fp64 so that subtracting the sums of earlier sequences
    cancels without loss and needs no host sync. The last I of each sequence is written back to
    state_pool[slot_ids[b]] ([num_slots + 1, S] fp32) in place.
    """
    T = u.shape[0]
    cu = cu_seqlens.long()
    seq_of_token = torch.searchsorted(cu[1:], torch.arange(T, device=u.device), right=True)
    csum = torch.cumsum(u.to(torch.float64), dim=0)
    before = torch.cat([csum.new_zeros(1, u.shape[1]), csum])[cu[:-1]]         # sum of earlier sequences' u
    carried = state_pool[slot_ids].to(torch.float64)                           # [B, S]
    integral = (csum - before[seq_of_token] + carried[seq_of_token]).to(torch.float32)
    has_tokens = (cu[1:] > cu[:-1])[:, None]
    last = integral[(cu[1:] - 1).clamp_min(0)]
    state_pool[slot_ids] = torch.where(has_tokens, last, state_pool[slot_ids])
    return integral


def decode_integral(u: torch.Tensor, state_pool: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """One token per sequence: I ← I + u for u [B, S]; updates state_pool in place and returns I [B, S]."""
    integral = state_pool[slot_ids] + u.float()
    state_pool[slot_ids] = integral
    return integral


def decode_readout(w: torch.Tensor, positions: torch.Tensor, theta: torch.Tensor, state_pool: torch.Tensor,
                   slot_ids: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The whole integral step of one decode token per sequence: I ← I + HoloRoPE(w, t) in slot_ids[b]
    (in place), then the readout s^0 = HoloRoPE^{-1}(I, t) [B, S] fp32. theta = holo_theta(S) (fp64).
    `bias` [S], when given, is added to w first (in fp32): the token_to_state projection's bias where the
    projection before ran without it."""
    w = w.float() if bias is None else w.float() + bias.float()
    u = _holo_rotate(w, positions, theta, 1.0)
    return _holo_rotate(decode_integral(u, state_pool, slot_ids), positions, theta, -1.0)


def state_cell_steps(s0: torch.Tensor, pre_norm: torch.Tensor, fc1: torch.Tensor, fc1_bias: torch.Tensor | None,
                     fc2: torch.Tensor, fc2_bias: torch.Tensor | None, alpha: torch.Tensor, post_norm: torch.Tensor,
                     eps: float) -> Iterator[torch.Tensor]:
    """The chain of Euler cells, l = 1 … L, from s^0 [T, S] fp32, weights stacked over layers:

        s^l = PostNorm^l(s^{l-1} + α^l ⊙_head fc2^l(SiLU(fc1^l(PreNorm^l(s^{l-1})))))

    The state stream stays fp32; the MLP runs in the weights' dtype. Yields each s^l [T, S] in that dtype
    (the input of layer l's state projection) in turn, so a caller can start layer l's state entry while
    the next cells are still to come."""
    T = s0.shape[0]
    s = s0.float()
    for i in range(fc1.shape[0]):
        x = rms_norm(s, pre_norm[i], eps).to(fc1.dtype)
        hidden = F.silu(F.linear(x, fc1[i], None if fc1_bias is None else fc1_bias[i]))
        u = F.linear(hidden, fc2[i], None if fc2_bias is None else fc2_bias[i]).float()
        u = (alpha[i].float()[:, None] * u.view(T, alpha.shape[1], -1)).flatten(1)
        s = rms_norm(s + u, post_norm[i], eps)
        yield s.to(fc1.dtype)


def decode_state_chain(x: torch.Tensor, x_rows: torch.Tensor | None, x_bias: torch.Tensor | None,
                       positions: torch.Tensor, theta: torch.Tensor, state_pool: torch.Tensor, slot_ids: torch.Tensor,
                       cells: tuple, eps: float, fold: torch.Tensor | None = None
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """A decode step's whole state chain, one token per sequence: w = x[x_rows] (x itself when x_rows is
    None; x_rows are the token ids when x is `token_state_table`), `decode_readout` with bias x_bias, the
    cells (`state_cell_steps`, cells = its seven weights in order), and with fold [L, R, S] each layer's
    folded GEMV. Yields (s^l, s^l·fold[l]ᵀ or None) per layer in turn."""
    w = x if x_rows is None else x[x_rows]
    s0 = decode_readout(w, positions, theta, state_pool, slot_ids, bias=x_bias)
    for i, s in enumerate(state_cell_steps(s0, *cells, eps)):
        yield s, None if fold is None else F.linear(s, fold[i])


def token_state_table(embed: torch.Tensor, weight: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """token_to_state (without its bias) of every token's embedding, [V, S] in the embedding's dtype: the
    projection of a decode token becomes a row gather. Formed in fp32, rounded once."""
    table = torch.empty(embed.shape[0], weight.shape[0], dtype=embed.dtype, device=embed.device)
    w = weight.float()
    for i in range(0, embed.shape[0], chunk):
        table[i:i + chunk] = F.linear(embed[i:i + chunk].float(), w)
    return table


def state_inputs(r: torch.Tensor, r_bias: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """A layer's attention input for its state entries: RMSNorm(r + r_bias) with the layer's input norm
    `weight` (r + r_bias rounded to r's dtype first, as the projection's stored output)."""
    return rms_norm(r if r_bias is None else r + r_bias, weight, eps)


# -- a layer's state entry from one GEMV (the fold) -----------------------------------------------------
#
# The entry's k/v is W_kv · RMSNorm(y)·w with y = W_p s + b (the state projection). With A = W_kv·diag(w):
#     A y = M s + c                      M = A W_p [2·Hkv·D, S],  c = A b
#     mean(y²) = sᵀG s + 2 gᵀs + β       G = W_pᵀW_p / N [S, S],  g = W_pᵀ b / N,  β = bᵀb / N
# so one GEMV of s against F = [M; G] gives both the unnormalised k/v and the quadratic form of the norm
# (G, g, β carry the 1/N of the mean, so the epilogue needs no N). It reads (2·Hkv·D + S)·S weights per
# layer instead of the projection's N·S and W_kv's 2·Hkv·D·N.

def fold_entry_weights(proj: torch.Tensor, proj_bias: torch.Tensor | None, norm_weight: torch.Tensor,
                       kv_weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(F [2·Hkv·D + S, S] in `dtype`, vec [2·Hkv·D + S + 1] fp32 = [c | g | β]) of one layer, from the state
    projection proj [N, S] (+ proj_bias [N]), the layer's input norm weight [N] and its k/v rows of the qkv
    weight kv_weight [2·Hkv·D, N]. Formed in fp64 on the weights' device and rounded once."""
    N = proj.shape[0]
    wp = proj.double()
    a = kv_weight.double() * norm_weight.double()[None, :]
    f = torch.cat([a @ wp, wp.T @ wp / N])
    if proj_bias is None:
        vec = torch.zeros(f.shape[0] + 1, dtype=torch.float64, device=proj.device)
    else:
        b = proj_bias.double()
        vec = torch.cat([a @ b, wp.T @ b / N, (b @ b / N)[None]])
    return f.to(dtype), vec.float()


def folded_entry(u: torch.Tensor, s: torch.Tensor, vec: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 num_kv_heads: int, head_dim: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's state entries from the folded GEMV u = s·Fᵀ [T, 2·Hkv·D + S] (any float dtype), its input
    s [T, S] and the layer's vec (`fold_entry_weights`): kv = (u_kv + c) · rsqrt(s·(u_G + 2g) + β + eps), then
    rotate-half RoPE on the keys' first cos.shape[-1] dims. fp32 inside; (k, v) [T, Hkv, D] in s's dtype."""
    T, S = s.shape
    KV = 2 * num_kv_heads * head_dim
    uf, sf = u.float(), s.float()
    ms = (sf * (uf[:, KV:] + 2 * vec[KV:KV + S])).sum(-1) + vec[KV + S]
    kv = (uf[:, :KV] + vec[:KV]) * torch.rsqrt(ms.clamp_min(0) + eps)[:, None]   # ≥ 0 up to rounding
    k, v = kv.view(T, 2, num_kv_heads, head_dim).unbind(1)
    return rope(k, cos.float(), sin.float()).to(s.dtype), v.to(s.dtype)
