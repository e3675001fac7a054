"""Triton kernels for the Spartacus monoid recurrence (GLA with per-key-dim decay).

Same functions and contract as `kernels/monoid.py`:
    S_t = diag(α_t) S_{t−1} + k_t v_tᵀ,   o_t = q_tᵀ S_t   (inclusive readout, q pre-scaled)
State rows are key dims, columns value dims. The decay is per key dim, so rows and columns of a state
evolve independently and a program can own any [BK, BV] tile of one head's state.

Decode: each program reads its tile once, keeps it in registers, and writes it back once, so a step is
bound by the state traffic (2 × 4·dk·dv bytes per head).

Prefill is the chunked (GLA) form in three launches over chunks of 64 tokens: (1) every chunk's own
contribution to the state, in parallel (one matmul each); (2) the only sequential part, an element-wise
scan per sequence that turns those into the state entering each chunk and writes the final state back;
(3) every chunk's outputs, in parallel, from its entering state. Matmuls run on the tensor cores; the
intra-sub-chunk term falls back to an exact pairwise form only where a gate decays too fast to factorise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hybridserve.kernels import l2_prefetch, pdl
from hybridserve.kernels import fused_triton
from hybridserve.kernels.fused_triton import (_head_norm, _load_f32, _log_decay, _stream_rows, _stream_span,
                                             _stream_tile, arrival_counters)

# From the sweeps in bench/kernels.py (H100, H 32, d 64; bench/results/kernels-h100.json).
DECODE_BV = 64
DECODE_WARPS = 2

LOG2E = tl.constexpr(1.4426950408889634)   # decays are carried in log2 units so every factor is one exp2


@dataclass(frozen=True)
class PrefillConfig:
    """Tiles of the three prefill passes (bench/prefill.py sweeps them; H100 figures in
    bench/results/prefill-h100.json: chunks of 64 beat 128 at T=4096, 227 vs 251 us per layer, because
    pass 1 is slower on 128-row tiles while the scan costs ~14 us either way)."""
    chunk: int = 64         # tokens per chunk: one stored entering state per chunk; chunks run in parallel
    sub: int = 16           # pass 3 sub-chunk: the span of the intra term (and of the exact pairwise form)
    factor_span: float = 64.0   # pass 3 factorises the intra term while a sub-chunk decays <= 2^-64 per dim
    local_bk: int = 64      # pass 1: [local_bk, local_bv] tile of a chunk's ΔS per program
    local_bv: int = 64
    local_warps: int = 4
    scan_rows: int = 8      # pass 2: state rows per program
    scan_warps: int = 2
    scan_stages: int = 1    # the scan prefetches two chunks ahead itself
    out_bv: int = 64        # pass 3: value columns per program (the intra term is recomputed per block)
    out_warps: int = 4
    out_stages: int = 2


PREFILL = PrefillConfig()
SPAN_SEQS = 128       # sequences a chunk program scans per vector load of cu_seqlens to find its chunk


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, la_ptr, s_ptr, slot_ptr, o_ptr,
                   sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sa_b, sa_h, so_b, so_h,
                   H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    rk = tl.arange(0, BK)
    rv = tl.program_id(2) * BV + tl.arange(0, BV)
    mk = rk < DK
    mv = rv < DV
    slot = tl.load(slot_ptr + b).to(tl.int64)

    q = tl.load(q_ptr + b * sq_b + h * sq_h + rk, mask=mk, other=0.).to(tl.float32)
    k = tl.load(k_ptr + b * sk_b + h * sk_h + rk, mask=mk, other=0.).to(tl.float32)
    la = tl.load(la_ptr + b * sa_b + h * sa_h + rk, mask=mk, other=0.).to(tl.float32)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + rv, mask=mv, other=0.).to(tl.float32)

    s_off = ((slot * H + h) * DK + rk[:, None]) * DV + rv[None, :]
    ms = mk[:, None] & mv[None, :]
    S = tl.load(s_ptr + s_off, mask=ms, other=0.)
    S = S * tl.exp(la)[:, None] + k[:, None] * v[None, :]
    o = tl.sum(S * q[:, None], axis=0)
    tl.store(s_ptr + s_off, S, mask=ms)
    tl.store(o_ptr + b * so_b + h * so_h + rv, o.to(o_ptr.dtype.element_ty), mask=mv)


@triton.jit
def _chunk_span(s, cu_ptr, N, C: tl.constexpr, SB: tl.constexpr):
    """Tokens [t0, t1) of chunk key s (t0 >= t1: no chunk has this key).

    Chunk j of sequence n has key cu[n] // C + n + j. Keys never collide and stay below T // C + N, so
    every pass finds its chunk from cu alone, without a host-side chunk table (no sync): the sequence is
    the last n with cu[n] // C + n <= s (first keys increase with n), counted over SB sequences per vector
    load of cu (a graph's unused sequences cost one more lane each, not a step of a dependent search)."""
    lo = s * 0 - 1
    bos = s * 0
    eos = s * 0
    for c0 in range(0, N, SB):
        idx = c0 + tl.arange(0, SB)
        ok = idx < N
        a = tl.load(cu_ptr + idx, mask=ok, other=0)
        b = tl.load(cu_ptr + idx + 1, mask=ok, other=0)
        hit = ok & (a // C + idx <= s)
        lo += tl.sum(hit.to(tl.int32), 0)
        last = hit & (idx == lo)          # the last hit so far is in this block
        bos = tl.where(tl.sum(last.to(tl.int32), 0) > 0, tl.sum(tl.where(last, a, 0), 0), bos)
        eos = tl.where(tl.sum(last.to(tl.int32), 0) > 0, tl.sum(tl.where(last, b, 0), 0), eos)
    t0 = bos + (s - bos // C - lo) * C
    return t0, tl.minimum(t0 + C, eos)


# N (sequences in the step) varies per step: not specialised on (jit_watch.py).
@triton.jit(do_not_specialize=["N"])
def _chunk_local_kernel(k_ptr, v_ptr, la_ptr, cu_ptr, h_ptr, g_ptr,
                        sk_t, sk_h, sv_t, sv_h, sa_t, sa_h, N,
                        H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr, SB: tl.constexpr):
    """Prefill pass 1, every chunk in parallel: what the chunk alone adds to the state,
    ΔS = Σ_j diag(exp(b_C − b_j)) k_j v_jᵀ (one matmul), into h[chunk], and its total log2-decay b_C
    into g[chunk]. b is the inclusive cumulative log-decay from the chunk start, so b_C − b_j <= 0."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    t0, t1 = _chunk_span(s, cu_ptr, N, C, SB)
    if t0 >= t1:
        return
    NV: tl.constexpr = (DV + BV - 1) // BV
    iv = tl.program_id(2) % NV
    rk = (tl.program_id(2) // NV) * BK + tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    mk = rk < DK
    mv = rv < DV
    tok = (t0 + tl.arange(0, C)).to(tl.int64)
    mt = tok < t1
    mtk = mt[:, None] & mk[None, :]
    k = tl.load(k_ptr + tok[:, None] * sk_t + h * sk_h + rk[None, :], mask=mtk, other=0.).to(tl.float32)
    la = tl.load(la_ptr + tok[:, None] * sa_t + h * sa_h + rk[None, :], mask=mtk, other=0.).to(tl.float32)
    v = tl.load(v_ptr + tok[:, None] * sv_t + h * sv_h + rv[None, :], mask=mt[:, None] & mv[None, :],
                other=0.).to(tl.float32)
    la = la * LOG2E
    b = tl.cumsum(la, axis=0)                # padded rows add 0, so the chunk total is the column sum
    g = tl.sum(la, axis=0)
    dS = tl.dot(tl.trans(k * tl.exp2(g[None, :] - b)), v, input_precision=PREC)
    head = s.to(tl.int64) * H + h
    tl.store(h_ptr + head * (DK * DV) + rk[:, None] * DV + rv[None, :], dS, mask=mk[:, None] & mv[None, :])
    if iv == 0:
        tl.store(g_ptr + head * DK + rk, g, mask=mk)


@triton.jit
def _chunk_scan_kernel(s_ptr, slot_ptr, cu_ptr, h_ptr, g_ptr,
                       H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                       BR: tl.constexpr, BV: tl.constexpr, C: tl.constexpr):
    """Prefill pass 2, the only sequential part: per sequence, S_next = diag(exp(b_C)) S + ΔS over its
    chunks in order, replacing each ΔS in h by the state entering that chunk; the final state goes back
    to the slot. Element-wise on [BR, dv] row tiles (rows are independent). The carried state is one
    FMA per step, so the step time is the load latency: the ΔS of the next two chunks are always in
    flight while the current one is applied."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    rr = tl.program_id(2) * BR + tl.arange(0, BR)
    rv = tl.arange(0, BV)
    mr = rr < DK
    mv = rv < DV
    tile = rr[:, None] * DV + rv[None, :]
    slot = tl.load(slot_ptr + n).to(tl.int64)
    bos = tl.load(cu_ptr + n)
    eos = tl.load(cu_ptr + n + 1)
    if bos >= eos:        # no token: the state stays (a prefill graph's unused sequences all sit on slot 0)
        return
    s_off = (slot * H + h) * (DK * DV) + tile
    S = tl.load(s_ptr + s_off, mask=mr[:, None] & mv[None, :], other=0.)
    c0 = bos // C + n
    c1 = c0 + tl.cdiv(eos - bos, C)
    head = c0.to(tl.int64) * H + h
    m1 = rr < tl.where(c0 < c1, DK, 0)          # chunk c0 exists
    dS1 = tl.load(h_ptr + head * (DK * DV) + tile, mask=m1[:, None] & mv[None, :], other=0.)
    g1 = tl.load(g_ptr + head * DK + rr, mask=m1, other=0.)
    m2 = rr < tl.where(c0 + 1 < c1, DK, 0)
    dS2 = tl.load(h_ptr + (head + H) * (DK * DV) + tile, mask=m2[:, None] & mv[None, :], other=0.)
    g2 = tl.load(g_ptr + (head + H) * DK + rr, mask=m2, other=0.)
    for c in range(c0, c1):
        head = tl.cast(c, tl.int64) * H + h
        m3 = rr < tl.where(c + 2 < c1, DK, 0)
        dS3 = tl.load(h_ptr + (head + 2 * H) * (DK * DV) + tile, mask=m3[:, None] & mv[None, :], other=0.)
        g3 = tl.load(g_ptr + (head + 2 * H) * DK + rr, mask=m3, other=0.)
        tl.store(h_ptr + head * (DK * DV) + tile, S, mask=mr[:, None] & mv[None, :])
        S = S * tl.exp2(g1)[:, None] + dS1
        dS1, g1, dS2, g2 = dS2, g2, dS3, g3
    tl.store(s_ptr + s_off, S, mask=mr[:, None] & mv[None, :])


@triton.jit(do_not_specialize=["N"])
def _chunk_output_kernel(q_ptr, k_ptr, v_ptr, la_ptr, h_ptr, cu_ptr, o_ptr,
                         sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sa_t, sa_h, so_t, so_h, N,
                         H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
                         SPAN: tl.constexpr, PREC: tl.constexpr, SB: tl.constexpr):
    """Prefill pass 3, every chunk in parallel: from the chunk's entering state h[chunk], run the chunk
    as sub-chunks of BC tokens. Per sub-chunk: the carried state through q·exp(b) (one matmul), the
    intra-sub-chunk term, then one matmul to advance the local state to the next sub-chunk.

    The intra term needs exp(b_i − b_j) for j <= i per key dim. While the sub-chunk's total decay stays
    within SPAN (log2 units) on every key dim, it factorises as (q·exp(b)) (k·exp(−b))ᵀ: two matmuls,
    k·exp(−b) <= 2^SPAN cannot overflow, and the masked pairs j > i are finite and dropped. A faster
    decay takes the exact pairwise form instead, one key row j at a time, where every factor is
    exp(b_i − b_j) <= 1: nothing overflows however fast a gate decays.
    """
    s = tl.program_id(0)
    h = tl.program_id(1)
    t0, t1 = _chunk_span(s, cu_ptr, N, C, SB)
    if t0 >= t1:
        return
    rk = tl.arange(0, BK)
    rv = tl.program_id(2) * BV + tl.arange(0, BV)
    rt = tl.arange(0, BC)
    mk = rk < DK
    mv = rv < DV
    S = tl.load(h_ptr + (s.to(tl.int64) * H + h) * (DK * DV) + rk[:, None] * DV + rv[None, :],
                mask=mk[:, None] & mv[None, :], other=0.)
    for u0 in range(t0, t1, BC):
        tok = (u0 + rt).to(tl.int64)
        mt = tok < t1
        mtk = mt[:, None] & mk[None, :]
        mtv = mt[:, None] & mv[None, :]
        q = tl.load(q_ptr + tok[:, None] * sq_t + h * sq_h + rk[None, :], mask=mtk, other=0.).to(tl.float32)
        k = tl.load(k_ptr + tok[:, None] * sk_t + h * sk_h + rk[None, :], mask=mtk, other=0.).to(tl.float32)
        la = tl.load(la_ptr + tok[:, None] * sa_t + h * sa_h + rk[None, :], mask=mtk, other=0.).to(tl.float32)
        v = tl.load(v_ptr + tok[:, None] * sv_t + h * sv_h + rv[None, :], mask=mtv, other=0.).to(tl.float32)
        la = la * LOG2E
        b = tl.cumsum(la, axis=0)            # inclusive, from the sub-chunk start

        qg = q * tl.exp2(b)
        o = tl.dot(qg, S, input_precision=PREC)
        if -tl.min(b) <= SPAN:
            A = tl.dot(qg, tl.trans(k * tl.exp2(-b)), input_precision=PREC)
            o += tl.dot(tl.where(rt[:, None] >= rt[None, :], A, 0.), v, input_precision=PREC)
        else:
            o += _pairwise_intra(q, b, k_ptr, v_ptr, la_ptr, u0, t1, h, sk_t, sk_h, sv_t, sv_h, sa_t, sa_h,
                                 rk, rv, rt, DK, DV, BK, BV, BC)
        tl.store(o_ptr + tok[:, None] * so_t + h * so_h + rv[None, :], o.to(o_ptr.dtype.element_ty), mask=mtv)

        b_last = tl.sum(la, axis=0)
        kd = k * tl.exp2(b_last[None, :] - b)
        S = S * tl.exp2(b_last)[:, None] + tl.dot(tl.trans(kd), v, input_precision=PREC)


@triton.jit
def _pairwise_intra(q, b, k_ptr, v_ptr, la_ptr, u0, t1, h, sk_t, sk_h, sv_t, sv_h, sa_t, sa_h, rk, rv, rt,
                    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr):
    """Σ_{j<=i} (Σ_d q_id k_jd exp(b_id − b_jd)) v_j for the sub-chunk at u0, one key row j at a time;
    b_j is re-accumulated from the rows (it matches the cumsum b to rounding)."""
    intra = tl.zeros([BC, BV], dtype=tl.float32)
    b_j = tl.zeros([BK], dtype=tl.float32)
    for j in tl.static_range(BC):
        tj = tl.cast(u0, tl.int64) + j
        mkj = rk < tl.where(tj < t1, DK, 0)         # row j past the chunk: nothing loaded
        k_j = tl.load(k_ptr + tj * sk_t + h * sk_h + rk, mask=mkj, other=0.).to(tl.float32)
        b_j += tl.load(la_ptr + tj * sa_t + h * sa_h + rk, mask=mkj, other=0.).to(tl.float32) * LOG2E
        v_j = tl.load(v_ptr + tj * sv_t + h * sv_h + rv, mask=rv < tl.where(tj < t1, DV, 0),
                      other=0.).to(tl.float32)
        a_j = tl.sum(q * k_j[None, :] * tl.exp2(tl.minimum(b - b_j[None, :], 0.)), axis=1)
        intra += tl.where(rt >= j, a_j, 0.)[:, None] * v_j[None, :]
    return intra


@triton.jit
def _fused_head_step(row, qw_ptr, kw_ptr, zb_ptr, S, h, rv, eps, dt: tl.constexpr, H: tl.constexpr,
                     D: tl.constexpr, GD: tl.constexpr, BD: tl.constexpr, BW: tl.constexpr, Q_FULL: tl.constexpr,
                     K_FULL: tl.constexpr, HAS_ZB: tl.constexpr, SOFTPLUS: tl.constexpr, CG: tl.constexpr):
    """monoid_prep + decode of head h's state tile S [BD, value block rv] from the qkvz projection row:
    returns the new tile and its outputs (q, k, log α never go through memory). CG: the row is read from
    L2 (another program of the same kernel wrote it, kernels/spartacus_step_triton.py)."""
    rk = tl.arange(0, BD)
    mk = rk < D
    mv = rv < D
    W = H * D
    hd = h * D + rk
    q = _load_f32(row + hd, mk, CG)[None, :]
    k = _load_f32(row + W + hd, mk, CG)[None, :]
    if Q_FULL or K_FULL:      # a full-width norm: the whole row's sum of squares, per program
        rw = tl.arange(0, BW)
        mw = rw < W
    if Q_FULL:
        qa = _load_f32(row + rw, mw, CG)
        q = q * tl.rsqrt(tl.sum(qa * qa, axis=0) / W + eps) * tl.load(qw_ptr + hd, mask=mk, other=0.).to(tl.float32)[None, :]
    else:
        q = _head_norm(q, qw_ptr, hd[None, :], rk[None, :], mk[None, :], eps, D, W, False)
    if K_FULL:
        ka = _load_f32(row + W + rw, mw, CG)
        k = k * tl.rsqrt(tl.sum(ka * ka, axis=0) / W + eps) * tl.load(kw_ptr + hd, mask=mk, other=0.).to(tl.float32)[None, :]
    else:
        k = _head_norm(k, kw_ptr, hd[None, :], rk[None, :], mk[None, :], eps, D, W, False)
    q = tl.reshape(q, (BD,)).to(dt).to(tl.float32)                   # stored as monoid_prep stores them
    k = tl.reshape(k, (BD,)).to(dt).to(tl.float32)
    k = (k / (1.0 + tl.exp(-k))).to(dt).to(tl.float32)
    v = _load_f32(row + 2 * W + h * D + rv, mv, CG)
    if GD == 1:      # one gate per head, the same decay on every key dim
        la = _log_decay(row + 3 * W, zb_ptr, h + rk * 0, mk, HAS_ZB, SOFTPLUS, CG)
    else:
        la = _log_decay(row + 3 * W, zb_ptr, hd, mk, HAS_ZB, SOFTPLUS, CG)
    S = S * tl.exp(la)[:, None] + k[:, None] * v[None, :]
    return S, tl.sum(S * q[:, None], axis=0)


@triton.jit
def _fused_decode_kernel(x_ptr, qw_ptr, kw_ptr, zb_ptr, s_ptr, slot_ptr, o_ptr, sx, eps, pf_ptr, pf_bytes,
                         H: tl.constexpr, D: tl.constexpr, GD: tl.constexpr, BD: tl.constexpr,
                         BV: tl.constexpr, BW: tl.constexpr, Q_FULL: tl.constexpr, K_FULL: tl.constexpr,
                         HAS_ZB: tl.constexpr, SOFTPLUS: tl.constexpr, PF_ROWS: tl.constexpr,
                         PF_LANES: tl.constexpr, PF_CHUNK: tl.constexpr, PF_LINES: tl.constexpr,
                         PF_EARLY: tl.constexpr, PDL: tl.constexpr):
    """monoid_prep + decode for one (row, head, value block); the PF_ROWS "heads" past H of each row ask L2 for
    the o projection's weight instead (kernels/l2_prefetch.py)."""
    if PF_ROWS > 0:
        if tl.program_id(1) >= H:
            NV = tl.num_programs(2)
            l2_prefetch.enter(PDL, True, pf_ptr, pf_bytes, pf_ptr, 0,
                              (tl.program_id(0) * PF_ROWS + tl.program_id(1) - H) * NV + tl.program_id(2),
                              tl.num_programs(0) * PF_ROWS * NV, PF_LANES, PF_CHUNK, PF_LINES, PF_EARLY)
        else:
            _fused_decode_program(x_ptr, qw_ptr, kw_ptr, zb_ptr, s_ptr, slot_ptr, o_ptr, sx, eps, H, D, GD, BD, BV,
                                  BW, Q_FULL, K_FULL, HAS_ZB, SOFTPLUS, PDL)
    else:
        _fused_decode_program(x_ptr, qw_ptr, kw_ptr, zb_ptr, s_ptr, slot_ptr, o_ptr, sx, eps, H, D, GD, BD, BV, BW,
                              Q_FULL, K_FULL, HAS_ZB, SOFTPLUS, PDL)


@triton.jit
def _fused_decode_program(x_ptr, qw_ptr, kw_ptr, zb_ptr, s_ptr, slot_ptr, o_ptr, sx, eps,
                          H: tl.constexpr, D: tl.constexpr, GD: tl.constexpr, BD: tl.constexpr,
                          BV: tl.constexpr, BW: tl.constexpr, Q_FULL: tl.constexpr, K_FULL: tl.constexpr,
                          HAS_ZB: tl.constexpr, SOFTPLUS: tl.constexpr, PDL: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    rk = tl.arange(0, BD)
    rv = tl.program_id(2) * BV + tl.arange(0, BV)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    s_off = ((slot * H + h) * D + rk[:, None]) * D + rv[None, :]
    ms = (rk < D)[:, None] & (rv < D)[None, :]
    S = tl.load(s_ptr + s_off, mask=ms, other=0.)        # this slot's state: untouched so far this step
    if PDL:
        pdl.enter(PDL)
    dt = o_ptr.dtype.element_ty
    S, o = _fused_head_step(x_ptr + b * sx, qw_ptr, kw_ptr, zb_ptr, S, h, rv, eps, dt, H, D, GD, BD, BW,
                            Q_FULL, K_FULL, HAS_ZB, SOFTPLUS, False)
    tl.store(s_ptr + s_off, S, mask=ms)
    tl.store(o_ptr + (b * H + h) * D + rv, o.to(dt), mask=rv < D)


def fused_decode(qkvz: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor, decay_bias: torch.Tensor | None,
                 num_heads: int, head_dim: int, eps: float, decay_gate: str, state_pool: torch.Tensor,
                 slot_ids: torch.Tensor, prefetch: torch.Tensor | None = None) -> torch.Tensor:
    """See kernels/monoid.py `fused_decode`. One launch per layer and step; CUDA-graph safe."""
    B = qkvz.shape[0]
    H, D = num_heads, head_dim
    W = H * D
    if qkvz.stride(-1) != 1:
        qkvz = qkvz.contiguous()
    _check_pool(state_pool, H, D, D)
    o = torch.empty(B, H, D, dtype=qkvz.dtype, device=qkvz.device)
    BV = min(DECODE_BV, triton.next_power_of_2(D))
    while BV > 16 and B * H * triton.cdiv(D, BV) < 256:    # a lone row: more, smaller programs
        BV //= 2
    NV = triton.cdiv(D, BV)
    pf, pf_bytes, _, _, parts = l2_prefetch.plan(prefetch, qkvz.device)
    pf_rows = triton.cdiv(parts, NV)
    if B:
        _fused_decode_kernel[(B, H + pf_rows, NV)](
            qkvz, q_norm, k_norm, decay_bias if decay_bias is not None else q_norm, state_pool, slot_ids, o,
            qkvz.stride(0), eps, pf if pf is not None else qkvz, pf_bytes, H=H, D=D,
            GD=(qkvz.shape[1] - 3 * W) // H, BD=triton.next_power_of_2(D), BV=BV, BW=triton.next_power_of_2(W),
            Q_FULL=q_norm.numel() == W, K_FULL=k_norm.numel() == W, HAS_ZB=decay_bias is not None,
            SOFTPLUS=decay_gate == "neg_softplus", PF_ROWS=pf_rows, PF_LANES=32 * DECODE_WARPS,
            **l2_prefetch.constexprs(), num_warps=DECODE_WARPS,
            **pdl.launch_kwargs(qkvz.device, early=True))
    return o


# A batch-1 decode step's q|k|v|z projection and the recurrence in one kernel (`projection_decode`): the
# streamed GEMV's programs each own a run of one head's rows (q, k, v and gate rows of that head, P
# programs a head); each stores its outputs, then counts itself in on the head's arrival counter, and the
# last of the head's P programs runs that head's recurrence (monoid_prep + decode, `_fused_head_step`) on
# the full 64×64 state tile. The recurrence kernel's boundary (its launch wait, and the o projection
# waiting on it) leaves the step. Per-head q/k norms only (a full-width norm needs every head's row).
# Off: slower where measured. H100, same process, three rounds in turn: the Spartacus batch-1 step 1.082 ms
# separate vs 1.102–1.104 inside (16 or 12 programs a head, state read early or late; 8 or 17 a head 1.144–1.159;
# bench/results/decode_latency_projection-h100.json); the 16-layer chain alone (bench/projection_chain.py)
# 1.070 vs 1.088–1.091 ms, 1.011 with no recurrence at all. The outputs' store, the release fence and the
# atomic, then the last program's reads of its head's row and state, are a chain longer than the kernel
# boundary they replace (the recurrence kernel costs ~3.7 µs a layer, its state read before its wait). Its
# registers (72–78 a thread, the stream GEMV's 58–64) leave 3 programs an SM, not 4; capped at 64 or 80: slower.
PROJECTION_FUSED = False
PROJECTION_PROGRAMS = 16       # programs per head
PROJECTION_EARLY_STATE = False  # every program loads the head's state tile before counting in (the last
                                # one then has it in registers); otherwise the last one loads it after
PROJECTION_MAXNREG: int | None = None   # a register cap (A/B knob, as fused_triton.GEMV_STREAM_MAXNREG)


@triton.jit
def _projection_decode_kernel(x_ptr, d_ptr, h_ptr, nw_ptr, w_ptr, y_ptr, cnt_ptr, qw_ptr, kw_ptr, zb_ptr,
                              s_ptr, slot_ptr, o_ptr, K, eps, H: tl.constexpr, D: tl.constexpr,
                              GD: tl.constexpr, BD: tl.constexpr, P: tl.constexpr, BN: tl.constexpr,
                              BK: tl.constexpr, KT: tl.constexpr, ADD: tl.constexpr, HAS_ZB: tl.constexpr,
                              SOFTPLUS: tl.constexpr, EARLY_STATE: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    h = pid % H           # program j of head h: every head's first programs are in the first wave
    R = 3 * D + GD
    r0, r1, T = _stream_span(R, pid // H, P, BN, KT)
    w, u = _stream_tile(w_ptr, R, K, r0, r1, 0, T, BN, BK, KT, False, h, H, D, GD, EW="")   # weights: before the wait
    if PDL:
        pdl.enter(PDL)
    _stream_rows(x_ptr, d_ptr, h_ptr, nw_ptr, w_ptr, y_ptr, R, K, eps, r0, r1, T, w, u, pid == 0, BN, BK, KT,
                 ADD, True, False, False, h, H, D, GD, EW="")
    rk = tl.arange(0, BD)
    ms = (rk < D)[:, None] & (rk < D)[None, :]
    s_off = ((tl.load(slot_ptr).to(tl.int64) * H + h) * D + rk[:, None]) * D + rk[None, :]
    if EARLY_STATE:
        S = tl.load(s_ptr + s_off, mask=ms, other=0.)      # only the head's last program changes it
    tl.debug_barrier()                                    # every warp's outputs are stored before counting in
    cnt = cnt_ptr + h
    if tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == P - 1:
        if not EARLY_STATE:
            S = tl.load(s_ptr + s_off, mask=ms, other=0.)
        dt = o_ptr.dtype.element_ty
        S, o = _fused_head_step(y_ptr, qw_ptr, kw_ptr, zb_ptr, S, h, rk, eps, dt, H, D, GD, BD, BD, False, False,
                                HAS_ZB, SOFTPLUS, True)
        tl.store(s_ptr + s_off, S, mask=ms)
        tl.store(o_ptr + h * D + rk, o.to(dt), mask=rk < D)
        tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")   # zero again for the next call


def projection_decode(h: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, qkvz_weight: torch.Tensor,
                      q_norm: torch.Tensor, k_norm: torch.Tensor, decay_bias: torch.Tensor | None, num_heads: int,
                      head_dim: int, eps: float, decay_gate: str, state_pool: torch.Tensor,
                      slot_ids: torch.Tensor,
                      prefetch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """See kernels/monoid.py `projection_decode`. One row with per-head q/k norms and a streamed GEMV shape:
    one kernel (above); otherwise the projection, then `fused_decode` (which asks L2 for `prefetch`)."""
    H, D = num_heads, head_dim
    N, K = qkvz_weight.shape
    config = fused_triton.gemv_stream_config(N, K)
    if not (PROJECTION_FUSED and fused_triton.GEMV_STREAM and config and h.shape[0] == 1 and q_norm.numel() == D
            and k_norm.numel() == D and qkvz_weight.is_contiguous() and (N - 3 * H * D) % H == 0):
        h, qkvz = fused_triton.add_norm_linear(h, delta, norm_weight, qkvz_weight, eps, before_block=True)
        return h, fused_decode(qkvz, q_norm, k_norm, decay_bias, H, D, eps, decay_gate, state_pool, slot_ids,
                               prefetch)
    _check_pool(state_pool, H, D, D)
    x, delta, h = fused_triton._gemv_inputs(h, delta)
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    o = torch.empty(1, H, D, dtype=x.dtype, device=x.device)
    BN, BK, warps = config[:3]
    P = PROJECTION_PROGRAMS
    _projection_decode_kernel[(H * P,)](
        x, delta if delta is not None else x, h, norm_weight, qkvz_weight, y, arrival_counters(x.device, H),
        q_norm, k_norm, decay_bias if decay_bias is not None else q_norm, state_pool, slot_ids, o, K, eps,
        H=H, D=D, GD=(N - 3 * H * D) // H, BD=triton.next_power_of_2(D), P=P, BN=BN, BK=BK,
        KT=triton.cdiv(K, BK), ADD=delta is not None, HAS_ZB=decay_bias is not None,
        SOFTPLUS=decay_gate == "neg_softplus", EARLY_STATE=PROJECTION_EARLY_STATE, num_warps=warps, num_stages=1,
        **pdl.launch_kwargs(x.device), **pdl.register_cap(PROJECTION_MAXNREG, x.device))
    return h, o


def _check_pool(state_pool: torch.Tensor, H: int, dk: int, dv: int) -> None:
    assert state_pool.dtype == torch.float32 and state_pool.is_contiguous(), "state pool: contiguous fp32"
    assert tuple(state_pool.shape[1:]) == (H, dk, dv), f"state pool {tuple(state_pool.shape)} vs {(H, dk, dv)}"


def _last_contig(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def decode_launch(q, k, v, log_a, state_pool, slot_ids, BV: int, num_warps: int) -> torch.Tensor:
    """decode_step with an explicit tile config (the benchmark sweeps it)."""
    q, k, v, log_a = _last_contig(q, k, v, log_a)
    B, H, dk = q.shape
    dv = v.shape[-1]
    _check_pool(state_pool, H, dk, dv)
    o = torch.empty(B, H, dv, dtype=q.dtype, device=q.device)
    BV = min(BV, triton.next_power_of_2(dv))
    grid = (B, H, triton.cdiv(dv, BV))
    _decode_kernel[grid](q, k, v, log_a, state_pool, slot_ids, o,
                         q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                         log_a.stride(0), log_a.stride(1), o.stride(0), o.stride(1),
                         H=H, DK=dk, DV=dv, BK=triton.next_power_of_2(dk), BV=BV, num_warps=num_warps)
    return o


def decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_a: torch.Tensor,
                state_pool: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """One token per row: q, k, log_a [B, H, dk], v [B, H, dv]; updates state_pool[slot_ids] in place.

    CUDA-graph safe: no host syncs; the grid depends on shapes only.
    """
    return decode_launch(q, k, v, log_a, state_pool, slot_ids, DECODE_BV, DECODE_WARPS)


def prefill_states(k, v, log_a, cu_seqlens, state_pool, slot_ids, cfg: PrefillConfig) -> torch.Tensor:
    """Passes 1 and 2: returns h [T // chunk + N, H, dk, dv] fp32, the state entering each chunk (keyed
    as in `_chunk_span`), and leaves each sequence's final state in its slot."""
    T, H, dk = k.shape
    dv = v.shape[-1]
    N = slot_ids.shape[0]
    keys = T // cfg.chunk + N
    h = torch.empty(keys, H, dk, dv, dtype=torch.float32, device=k.device)
    g = torch.empty(keys, H, dk, dtype=torch.float32, device=k.device)
    BK = max(16, min(cfg.local_bk, triton.next_power_of_2(dk)))     # tl.dot needs every dim >= 16
    BV = max(16, min(cfg.local_bv, triton.next_power_of_2(dv)))
    # tf32x3: ΔS feeds the final state and every later token, so it keeps fp32 accuracy
    _chunk_local_kernel[(keys, H, triton.cdiv(dk, BK) * triton.cdiv(dv, BV))](
        k, v, log_a, cu_seqlens, h, g,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), log_a.stride(0), log_a.stride(1), N,
        H=H, DK=dk, DV=dv, BK=BK, BV=BV, C=cfg.chunk, PREC="tf32x3", SB=SPAN_SEQS, num_warps=cfg.local_warps)
    BR = min(cfg.scan_rows, triton.next_power_of_2(dk))
    _chunk_scan_kernel[(N, H, triton.cdiv(dk, BR))](
        state_pool, slot_ids, cu_seqlens, h, g, H=H, DK=dk, DV=dv, BR=BR, BV=triton.next_power_of_2(dv),
        C=cfg.chunk, num_warps=cfg.scan_warps, num_stages=cfg.scan_stages)
    return h


def prefill_outputs(q, k, v, log_a, cu_seqlens, h, cfg: PrefillConfig) -> torch.Tensor:
    """Pass 3: the outputs [T, H, dv] from the chunk entering states h of `prefill_states`."""
    T, H, dk = q.shape
    dv = v.shape[-1]
    N = cu_seqlens.shape[0] - 1
    o = torch.empty(T, H, dv, dtype=q.dtype, device=q.device)
    BV = max(16, min(cfg.out_bv, triton.next_power_of_2(dv)))
    # bf16/fp16 outputs round far above tf32's error; fp32 outputs keep fp32 accuracy with tf32x3
    prec = "tf32x3" if q.dtype == torch.float32 else "tf32"
    _chunk_output_kernel[(T // cfg.chunk + N, H, triton.cdiv(dv, BV))](
        q, k, v, log_a, h, cu_seqlens, o,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        log_a.stride(0), log_a.stride(1), o.stride(0), o.stride(1), N,
        H=H, DK=dk, DV=dv, BK=max(16, triton.next_power_of_2(dk)), BV=BV, C=cfg.chunk, BC=cfg.sub,
        SPAN=cfg.factor_span, PREC=prec, SB=SPAN_SEQS, num_warps=cfg.out_warps, num_stages=cfg.out_stages)
    return o


def prefill_launch(q, k, v, log_a, cu_seqlens, state_pool, slot_ids, cfg: PrefillConfig) -> torch.Tensor:
    """varlen_prefill with an explicit tile config (the benchmark sweeps it)."""
    q, k, v, log_a = _last_contig(q, k, v, log_a)
    T, H, dk = q.shape
    _check_pool(state_pool, H, dk, v.shape[-1])
    assert cfg.chunk % cfg.sub == 0 and cfg.sub >= 16, "chunk must be a multiple of sub >= 16"
    if slot_ids.shape[0] == 0:
        return torch.empty(T, H, v.shape[-1], dtype=q.dtype, device=q.device)
    h = prefill_states(k, v, log_a, cu_seqlens, state_pool, slot_ids, cfg)
    return prefill_outputs(q, k, v, log_a, cu_seqlens, h, cfg)


def varlen_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_a: torch.Tensor,
                   cu_seqlens: torch.Tensor, state_pool: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """Packed tokens [T, H, ·]; sequence n spans cu_seqlens[n]:cu_seqlens[n+1], starts from
    state_pool[slot_ids[n]] and writes its final state back there.

    Chunked form in three launches (see the module docstring); no host sync.
    """
    return prefill_launch(q, k, v, log_a, cu_seqlens, state_pool, slot_ids, PREFILL)
