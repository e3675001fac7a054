"""Gated delta rule with grouped-value heads (plain PyTorch references; specs/gated_deltanet.md §6–§7).

Per value head j (key head j // r, r = Hv / Hk), state S [dk, dv] maps keys to values. Per token:
    S ← exp(g)·S;  S ← S + k·(β·(v − Sᵀk))ᵀ;  o = Sᵀq
q and k arrive l2-normalised, q already scaled by dk^-1/2 (the layer does that). Everything is computed
in fp32 and the state is fp32; outputs come back in q's dtype.

`mix` is the layer between its two projections (conv, q/k norms, gates, the rule, the gated output
norm); `fused_decode` is its decode step, which the Triton version runs as one kernel.

The Triton versions in gated_delta_triton.py keep these exact signatures.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hybridserve.kernels import short_conv


def _value_heads(x: torch.Tensor, num_v_heads: int) -> torch.Tensor:
    """[..., Hk, d] → [..., Hv, d] in fp32: value head j reads key head j // r (repeat_interleave, not repeat)."""
    return x.float().repeat_interleave(num_v_heads // x.shape[-2], dim=-2)


def naive(q, k, v, g, beta, initial_state=None):
    """Token-by-token recurrence of one sequence: q, k [T, Hk, dk], v [T, Hv, dv], g, beta [T, Hv].

    Returns (o [T, Hv, dv], S [Hv, dk, dv] fp32). This is the definition every other path is tested against.
    """
    T, Hv, dv = v.shape
    qf, kf = _value_heads(q, Hv), _value_heads(k, Hv)
    vf, gf, bf = v.float(), g.float(), beta.float()
    S = (torch.zeros(Hv, k.shape[-1], dv, dtype=torch.float32, device=v.device) if initial_state is None
         else initial_state.float().clone())
    o = torch.empty(T, Hv, dv, dtype=torch.float32, device=v.device)
    for t in range(T):
        S = S * gf[t].exp()[:, None, None]
        read = torch.einsum("hk,hkv->hv", kf[t], S)
        delta = bf[t][:, None] * (vf[t] - read)
        S = S + kf[t][:, :, None] * delta[:, None, :]
        o[t] = torch.einsum("hk,hkv->hv", qf[t], S)
    return o.to(q.dtype), S


def chunked(q, k, v, g, beta, initial_state=None, chunk_size: int = 64):
    """The same recurrence in chunks (WY / UT form): matmuls inside a chunk, one state hand-off per chunk.

    Within a chunk with cumulative log decay Γ (Γ_t = Σ_{s≤t} g_s) and entry state S₀, the deltas
    Δ_t = β_t(v_t − Sᵀ_{t−1} k_t) solve the unit-lower-triangular system
        (I + A) Δ = β⊙V − diag(β·e^Γ) K S₀,   A[t, s] = β_t e^{Γ_t−Γ_s} k_tᵀk_s  (s < t),
    after which  O = diag(e^Γ) Q S₀ + (QKᵀ ⊙ e^{Γ_t−Γ_s})_{s≤t} Δ  and  S_L = e^{Γ_L} S₀ + (e^{Γ_L−Γ} ⊙ K)ᵀ Δ.
    A last chunk shorter than chunk_size is processed as is (no padding).
    """
    T, Hv, dv = v.shape
    qf = _value_heads(q, Hv).transpose(0, 1)        # [Hv, T, dk]
    kf = _value_heads(k, Hv).transpose(0, 1)
    vf = v.float().transpose(0, 1)                  # [Hv, T, dv]
    gf, bf = g.float().t(), beta.float().t()        # [Hv, T]
    S = (torch.zeros(Hv, k.shape[-1], dv, dtype=torch.float32, device=v.device) if initial_state is None
         else initial_state.float().clone())
    o = torch.empty(Hv, T, dv, dtype=torch.float32, device=v.device)
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        L = end - start
        qc, kc, vc, bc = qf[:, start:end], kf[:, start:end], vf[:, start:end], bf[:, start:end]
        gam = gf[:, start:end].cumsum(-1)                                     # [Hv, L]
        causal = torch.ones(L, L, dtype=torch.bool, device=v.device).tril()
        decay = (gam[:, :, None] - gam[:, None, :]).masked_fill(~causal, float("-inf")).exp()  # [Hv, L, L]
        kk = kc @ kc.transpose(-1, -2)
        system = torch.eye(L, device=v.device) + (bc[:, :, None] * kk * decay).tril(-1)
        rhs = bc[:, :, None] * (vc - gam.exp()[:, :, None] * (kc @ S))
        delta = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)  # [Hv, L, dv]
        o[:, start:end] = gam.exp()[:, :, None] * (qc @ S) + ((qc @ kc.transpose(-1, -2)) * decay) @ delta
        last = gam[:, -1:]
        S = last.exp()[:, :, None] * S + ((last - gam).exp()[:, :, None] * kc).transpose(-1, -2) @ delta
    return o.transpose(0, 1).to(q.dtype), S


def varlen_prefill(q, k, v, g, beta, cu_seqlens, state_pool, slot_ids):
    """Packed varlen batch: sequence b (tokens cu_seqlens[b]:cu_seqlens[b+1]) continues from
    state_pool[slot_ids[b]] and writes its final state back there in place. Returns o [T, Hv, dv]."""
    o = torch.empty(v.shape, dtype=q.dtype, device=v.device)
    bounds = cu_seqlens.tolist()
    for b, slot in enumerate(slot_ids.tolist()):
        s, e = bounds[b], bounds[b + 1]
        if e == s:
            continue
        o[s:e], final = chunked(q[s:e], k[s:e], v[s:e], g[s:e], beta[s:e], state_pool[slot])
        state_pool[slot] = final
    return o


def decode_step(q, k, v, g, beta, state_pool, slot_ids):
    """One token per sequence (q, k [B, Hk, dk], v [B, Hv, dv], g, beta [B, Hv]), updating
    state_pool[slot_ids[b]] in place. Pad rows point at slot 0 and only ever touch it."""
    Hv = v.shape[1]
    qf, kf = _value_heads(q, Hv), _value_heads(k, Hv)
    S = state_pool[slot_ids] * g.float().exp()[:, :, None, None]                  # [B, Hv, dk, dv]
    read = torch.einsum("bhk,bhkv->bhv", kf, S)
    delta = beta.float()[:, :, None] * (v.float() - read)
    S = S + kf[:, :, :, None] * delta[:, :, None, :]
    state_pool[slot_ids] = S
    return torch.einsum("bhk,bhkv->bhv", qf, S).to(q.dtype)


# -- the layer between its projections ------------------------------------------------------------

def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """HF torch form x·rsqrt(Σx² + eps), in fp32 (gated_deltanet.md §10)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def gated_rms_norm(o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise each head over dv, then gate with silu(z); fp32 inside, o's dtype out."""
    of = o.float()
    y = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return (y * F.silu(z.float())).to(o.dtype)


def mix(proj: torch.Tensor, conv_weight: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
        norm_weight: torch.Tensor, eps: float, head_k_dim: int,
        conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], rule: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Steps 2–8 of gated_deltanet.md §6 on the in_proj output proj [T, conv_dim + value_dim + 2·Hv]
    (rows [q | k | v | z | b | a]): `conv` maps the first conv_dim columns and the conv weight [conv_dim, K]
    to the conv output, `rule(q, k, v, g, beta)` runs the recurrence. Returns y [T, value_dim] for out_proj.
    Head counts follow from the weights: Hv = len(A_log), dv = len(norm_weight)."""
    T = proj.shape[0]
    C, Hv, dv, dk = conv_weight.shape[0], A_log.shape[0], norm_weight.shape[0], head_k_dim
    V = Hv * dv
    Kd = (C - V) // 2
    mixed, z, b, a = proj.split([C, V, Hv, Hv], -1)
    q, k, v = conv(mixed, conv_weight).split([Kd, Kd, V], -1)
    q = (l2norm(q.view(T, Kd // dk, dk).float()) * dk ** -0.5).to(proj.dtype)
    k = l2norm(k.view(T, Kd // dk, dk).float()).to(proj.dtype)
    v = v.view(T, Hv, dv)
    beta = torch.sigmoid(b.float())
    g = -A_log.exp() * F.softplus(a.float() + dt_bias)
    o = rule(q, k, v, g, beta)
    return gated_rms_norm(o, z.view(T, Hv, dv), norm_weight, eps).reshape(T, V)


def fused_decode(proj: torch.Tensor, conv_weight: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
                 norm_weight: torch.Tensor, eps: float, conv_pool: torch.Tensor, state_pool: torch.Tensor,
                 slot_ids: torch.Tensor) -> torch.Tensor:
    """`mix` for one token per sequence (proj [B, ·]): the conv window conv_pool[slot_ids[b]] [conv_dim, K−1]
    and the state state_pool[slot_ids[b]] [Hv, dk, dv] advance in place. Returns y [B, value_dim].
    Pad rows point at slot 0 and only ever touch it."""
    return mix(proj, conv_weight, A_log, dt_bias, norm_weight, eps, state_pool.shape[2],
               lambda u, w: short_conv.decode_step(u, w, conv_pool, slot_ids),
               lambda *qkvgb: decode_step(*qkvgb, state_pool, slot_ids))
