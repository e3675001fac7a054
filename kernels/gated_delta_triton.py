"""Triton kernels for the gated delta rule (Gated DeltaNet), same contract as `kernels/gated_delta.py`.

Per token, per value head (key head = value head // (Hv/Hk)):
    S ← exp(g)·S;  u = Sᵀk;  δ = β(v − u);  S ← S + k δᵀ;  o = Sᵀq
Every step acts on each value column of S independently (u_j reads column j only), so a program owns a
[dk, BV] column tile: state read once, kept in registers over all of a sequence's tokens, written once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridserve.kernels import pdl

# From the sweeps in bench/kernels.py (H100, NeoLLM shapes; bench/results/kernels-h100.json).
DECODE_BV = 32
DECODE_WARPS = 2
PREFILL_BV = 16
PREFILL_WARPS = 1


@triton.jit
def _delta_step(S, q, k, v, g, beta):
    S = S * tl.exp(g)
    u = tl.sum(S * k[:, None], axis=0)
    S = S + k[:, None] * (beta * (v - u))[None, :]
    o = tl.sum(S * q[:, None], axis=0)
    return S, o


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, s_ptr, slot_ptr, o_ptr,
                   sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sg_b, sb_b, so_b, so_h,
                   HV: tl.constexpr, GROUP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr):
    b = tl.program_id(0)
    hv = tl.program_id(1)
    hk = hv // GROUP
    rk = tl.arange(0, BK)
    rv = tl.program_id(2) * BV + tl.arange(0, BV)
    mk = rk < DK
    mv = rv < DV
    slot = tl.load(slot_ptr + b).to(tl.int64)

    q = tl.load(q_ptr + b * sq_b + hk * sq_h + rk, mask=mk, other=0.).to(tl.float32)
    k = tl.load(k_ptr + b * sk_b + hk * sk_h + rk, mask=mk, other=0.).to(tl.float32)
    v = tl.load(v_ptr + b * sv_b + hv * sv_h + rv, mask=mv, other=0.).to(tl.float32)
    g = tl.load(g_ptr + b * sg_b + hv).to(tl.float32)
    beta = tl.load(beta_ptr + b * sb_b + hv).to(tl.float32)

    s_off = ((slot * HV + hv) * DK + rk[:, None]) * DV + rv[None, :]
    ms = mk[:, None] & mv[None, :]
    S = tl.load(s_ptr + s_off, mask=ms, other=0.)
    S, o = _delta_step(S, q, k, v, g, beta)
    tl.store(s_ptr + s_off, S, mask=ms)
    tl.store(o_ptr + b * so_b + hv * so_h + rv, o.to(o_ptr.dtype.element_ty), mask=mv)


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, s_ptr, slot_ptr, cu_ptr, o_ptr,
                    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sg_t, sb_t, so_t, so_h,
                    HV: tl.constexpr, GROUP: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr):
    """Sequential in time. The next token's inputs are loaded before the current token's update so
    their memory latency overlaps the arithmetic instead of stalling every step."""
    n = tl.program_id(0)
    hv = tl.program_id(1)
    hk = hv // GROUP
    rk = tl.arange(0, BK)
    rv = tl.program_id(2) * BV + tl.arange(0, BV)
    mk = rk < DK
    mv = rv < DV
    slot = tl.load(slot_ptr + n).to(tl.int64)
    bos = tl.load(cu_ptr + n).to(tl.int64)
    eos = tl.load(cu_ptr + n + 1).to(tl.int64)
    if bos >= eos:        # no token: the state stays (a prefill graph's unused sequences all sit on slot 0)
        return

    s_off = ((slot * HV + hv) * DK + rk[:, None]) * DV + rv[None, :]
    ms = mk[:, None] & mv[None, :]
    S = tl.load(s_ptr + s_off, mask=ms, other=0.)

    # Masks as `index < bound-or-0`: one comparison covers both the tail and "no such token".
    live = bos < eos
    kb = tl.where(live, DK, 0)
    vb = tl.where(live, DV, 0)
    q = tl.load(q_ptr + bos * sq_t + hk * sq_h + rk, mask=rk < kb, other=0.).to(tl.float32)
    k = tl.load(k_ptr + bos * sk_t + hk * sk_h + rk, mask=rk < kb, other=0.).to(tl.float32)
    v = tl.load(v_ptr + bos * sv_t + hv * sv_h + rv, mask=rv < vb, other=0.).to(tl.float32)
    g = tl.load(g_ptr + bos * sg_t + hv, mask=live, other=0.).to(tl.float32)
    beta = tl.load(beta_ptr + bos * sb_t + hv, mask=live, other=0.).to(tl.float32)
    for t in range(bos, eos):
        nxt = t + 1
        more = nxt < eos
        kb = tl.where(more, DK, 0)
        vb = tl.where(more, DV, 0)
        q_n = tl.load(q_ptr + nxt * sq_t + hk * sq_h + rk, mask=rk < kb, other=0.).to(tl.float32)
        k_n = tl.load(k_ptr + nxt * sk_t + hk * sk_h + rk, mask=rk < kb, other=0.).to(tl.float32)
        v_n = tl.load(v_ptr + nxt * sv_t + hv * sv_h + rv, mask=rv < vb, other=0.).to(tl.float32)
        g_n = tl.load(g_ptr + nxt * sg_t + hv, mask=more, other=0.).to(tl.float32)
        beta_n = tl.load(beta_ptr + nxt * sb_t + hv, mask=more, other=0.).to(tl.float32)
        S, o = _delta_step(S, q, k, v, g, beta)
        tl.store(o_ptr + t * so_t + hv * so_h + rv, o.to(o_ptr.dtype.element_ty), mask=mv)
        q, k, v, g, beta = q_n, k_n, v_n, g_n, beta_n

    tl.store(s_ptr + s_off, S, mask=ms)


def _prep(q, k, v, g, beta, state_pool):
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    g, beta = (t if t.stride(-1) == 1 else t.contiguous() for t in (g, beta))
    hk, dk = q.shape[1:]
    hv, dv = v.shape[1:]
    assert hv % hk == 0, f"value heads {hv} must be a multiple of key heads {hk}"
    assert state_pool.dtype == torch.float32 and state_pool.is_contiguous(), "state pool: contiguous fp32"
    assert tuple(state_pool.shape[1:]) == (hv, dk, dv), f"state pool {tuple(state_pool.shape)} vs {(hv, dk, dv)}"
    return q, k, v, g, beta, hk, dk, hv, dv


def decode_launch(q, k, v, g, beta, state_pool, slot_ids, BV: int, num_warps: int) -> torch.Tensor:
    """decode_step with an explicit tile config (the benchmark sweeps it)."""
    q, k, v, g, beta, hk, dk, hv, dv = _prep(q, k, v, g, beta, state_pool)
    B = q.shape[0]
    o = torch.empty(B, hv, dv, dtype=q.dtype, device=q.device)
    BV = min(BV, triton.next_power_of_2(dv))
    _decode_kernel[(B, hv, triton.cdiv(dv, BV))](
        q, k, v, g, beta, state_pool, slot_ids, o,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), beta.stride(0), o.stride(0), o.stride(1),
        HV=hv, GROUP=hv // hk, DK=dk, DV=dv, BK=triton.next_power_of_2(dk), BV=BV, num_warps=num_warps)
    return o


def decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                state_pool: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """q, k [B, Hk, dk]; v [B, Hv, dv]; g, beta [B, Hv] fp32; updates state_pool[slot_ids] in place.

    CUDA-graph safe: no host syncs; the grid depends on shapes only.
    """
    return decode_launch(q, k, v, g, beta, state_pool, slot_ids, DECODE_BV, DECODE_WARPS)


def prefill_launch(q, k, v, g, beta, cu_seqlens, state_pool, slot_ids, BV: int, num_warps: int) -> torch.Tensor:
    """varlen_prefill with an explicit tile config (the benchmark sweeps it)."""
    q, k, v, g, beta, hk, dk, hv, dv = _prep(q, k, v, g, beta, state_pool)
    T = q.shape[0]
    N = slot_ids.shape[0]
    o = torch.empty(T, hv, dv, dtype=q.dtype, device=q.device)
    BV = min(BV, triton.next_power_of_2(dv))
    _prefill_kernel[(N, hv, triton.cdiv(dv, BV))](
        q, k, v, g, beta, state_pool, slot_ids, cu_seqlens, o,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), beta.stride(0), o.stride(0), o.stride(1),
        HV=hv, GROUP=hv // hk, DK=dk, DV=dv, BK=triton.next_power_of_2(dk), BV=BV, num_warps=num_warps)
    return o


def varlen_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                   cu_seqlens: torch.Tensor, state_pool: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """Packed tokens [T, ·, ·]; sequence n spans cu_seqlens[n]:cu_seqlens[n+1], starts from
    state_pool[slot_ids[n]] and writes its final state back there."""
    return prefill_launch(q, k, v, g, beta, cu_seqlens, state_pool, slot_ids, PREFILL_BV, PREFILL_WARPS)


# -- the whole decode step between the layer's projections ----------------------------------------
# One program per (sequence, key head) does the short conv of that group's q, k and v channels (advancing
# their window), the q/k l2 norms, and for all r = Hv/Hk value heads of the group at once ([r, dk, dv]
# state tile) the gates, the delta step and the gated output norm. A key head's q/k window is read and
# rewritten by one program only: a program per value head would race another's rewrite of the shared
# window. The state is loaded first, so its read overlaps the conv. Values are rounded to the model dtype
# where the unfused path stores them (conv output, normed q/k, o).
FUSED_WARPS = 4


@triton.jit
def _conv_silu(row_ptr, cw_ptr, win_ptr, ch, m, K: tl.constexpr, BW: tl.constexpr):
    """silu(Σ_j W[c, j]·[window | x][c, j]) for the channels ch [·, ·], rounded to the row's dtype (returned
    in fp32); the window of those channels shifts in x. A barrier keeps one thread's store from overtaking
    another thread's load of the same window column."""
    rj = tl.arange(0, BW)[None, None, :]
    wp = win_ptr + ch[:, :, None] * (K - 1) + rj
    m3 = m[:, :, None]
    x = tl.load(row_ptr + ch, mask=m, other=0.).to(win_ptr.dtype.element_ty)[:, :, None]   # as the window stores
    past = tl.load(wp, mask=m3 & (rj < K - 1), other=0.)
    w = tl.load(cw_ptr + ch[:, :, None] * K + rj, mask=m3 & (rj < K), other=0.)
    acc = tl.sum(tl.where(rj == K - 1, x, past).to(tl.float32) * w.to(tl.float32), axis=2)
    y = (acc * tl.sigmoid(acc)).to(row_ptr.dtype.element_ty).to(tl.float32)
    shifted = tl.where(rj == K - 2, x, tl.load(wp + 1, mask=m3 & (rj + 1 < K - 1), other=0.))
    tl.debug_barrier()
    tl.store(wp, shifted, mask=m3 & (rj < K - 1))
    return y


@triton.jit
def _fused_decode_kernel(p_ptr, cw_ptr, alog_ptr, dtb_ptr, nw_ptr, cpool_ptr, spool_ptr, slot_ptr, y_ptr,
                         sp_b, sy_b, q_scale, eps, HK: tl.constexpr, R: tl.constexpr, DK: tl.constexpr,
                         DV: tl.constexpr, K: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         BW: tl.constexpr, PDL: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    HV: tl.constexpr = HK * R
    KD: tl.constexpr = HK * DK
    VD: tl.constexpr = HV * DV
    C: tl.constexpr = 2 * KD + VD
    rr = tl.arange(0, BR)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    mr = rr < R
    mk = rk < DK
    mv = rv < DV
    hv = hk * R + rr                                                   # the group's value heads
    slot = tl.load(slot_ptr + b).to(tl.int64)
    s_off = ((slot * HV + hv[:, None, None]) * DK + rk[None, :, None]) * DV + rv[None, None, :]
    ms = mr[:, None, None] & mk[None, :, None] & mv[None, None, :]
    S = tl.load(spool_ptr + s_off, mask=ms, other=0.)                  # this slot's state: untouched so far this step
    if PDL:
        pdl.enter(PDL)
    row = p_ptr + b * sp_b
    win = cpool_ptr + slot * C * (K - 1)
    dt = p_ptr.dtype.element_ty

    # q (row 0) and k (row 1) of the key head, l2-normalised, q scaled by dk^-1/2
    two = tl.arange(0, 2)[:, None]
    qk = _conv_silu(row, cw_ptr, win, two * KD + hk * DK + rk[None, :], (two < 2) & mk[None, :], K, BW)
    qk = qk * tl.rsqrt(tl.sum(qk * qk, axis=1) + 1e-6)[:, None] * tl.where(two == 0, q_scale, 1.0)
    qk = qk.to(dt).to(tl.float32)
    q = tl.sum(tl.where(two == 0, qk, 0.), axis=0)
    k = tl.sum(tl.where(two == 1, qk, 0.), axis=0)

    mrv = mr[:, None] & mv[None, :]
    v = _conv_silu(row, cw_ptr, win, 2 * KD + hv[:, None] * DV + rv[None, :], mrv, K, BW)     # [BR, BV]
    beta = tl.sigmoid(tl.load(row + C + VD + hv, mask=mr, other=0.).to(tl.float32))
    a = tl.load(row + C + VD + HV + hv, mask=mr, other=0.).to(tl.float32) + tl.load(dtb_ptr + hv, mask=mr, other=0.)
    softplus = tl.where(a > 20., a, tl.log(1. + tl.exp(tl.minimum(a, 20.))))   # F.softplus, threshold 20
    g = -tl.exp(tl.load(alog_ptr + hv, mask=mr, other=0.)) * softplus

    S = S * tl.exp(g)[:, None, None]
    u = tl.sum(S * k[None, :, None], axis=1)
    S = S + k[None, :, None] * (beta[:, None] * (v - u))[:, None, :]
    o = tl.sum(S * q[None, :, None], axis=1).to(dt).to(tl.float32)     # [BR, BV]
    tl.store(spool_ptr + s_off, S, mask=ms)

    z = tl.load(row + C + hv[:, None] * DV + rv[None, :], mask=mrv, other=0.).to(tl.float32)
    nw = tl.load(nw_ptr + rv, mask=mv, other=0.).to(tl.float32)
    y = o * tl.rsqrt(tl.sum(o * o, axis=1) / DV + eps)[:, None] * nw[None, :] * (z * tl.sigmoid(z))
    tl.store(y_ptr + b * sy_b + hv[:, None] * DV + rv[None, :], y.to(y_ptr.dtype.element_ty), mask=mrv)


def fused_decode(proj: torch.Tensor, conv_weight: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
                 norm_weight: torch.Tensor, eps: float, conv_pool: torch.Tensor, state_pool: torch.Tensor,
                 slot_ids: torch.Tensor) -> torch.Tensor:
    """proj [B, conv_dim + value_dim + 2·Hv] (rows [q | k | v | z | b | a]) → y [B, value_dim]; advances
    conv_pool[slot_ids] and state_pool[slot_ids] in place. One launch, no host syncs: CUDA-graph safe."""
    B = proj.shape[0]
    C, K = conv_weight.shape
    _, hv, dk, dv = state_pool.shape
    hk = (C - hv * dv) // (2 * dk)
    assert 2 * hk * dk + hv * dv == C and hv % hk == 0 and K >= 2, "conv/state shapes do not match"
    assert proj.shape[1] == C + hv * dv + 2 * hv and proj.stride(-1) == 1, "proj: [B, conv_dim + value_dim + 2·Hv]"
    assert state_pool.dtype == torch.float32 and state_pool.is_contiguous(), "state pool: contiguous fp32"
    assert conv_pool.is_contiguous() and tuple(conv_pool.shape[1:]) == (C, K - 1), "conv pool: [·, C, K−1]"
    y = torch.empty(B, hv * dv, dtype=proj.dtype, device=proj.device)
    if B:
        _fused_decode_kernel[(B, hk)](
            proj, conv_weight.contiguous(), A_log, dt_bias, norm_weight, conv_pool, state_pool, slot_ids, y,
            proj.stride(0), y.stride(0), dk ** -0.5, eps, HK=hk, R=hv // hk, DK=dk, DV=dv, K=K,
            BR=triton.next_power_of_2(hv // hk), BK=triton.next_power_of_2(dk), BV=triton.next_power_of_2(dv),
            BW=triton.next_power_of_2(K),
            num_warps=FUSED_WARPS, **pdl.launch_kwargs(proj.device, early=True))
    return y
