"""Triton attention over the paged KV cache, beside `kernels/paged_attention.py`.

`decode` is flash-decoding; `varlen_prefill` is causal flash attention of packed new tokens over each
sequence's pages (prefix + themselves), optionally with the log-sum-exp.

Decode: one query token per sequence. A program owns (sequence, kv head, split of the context): it loads each
k/v tile once for all G = H/Hkv query heads of that kv head (GQA packing, so KV bytes are read once, not
G times), keeps an online softmax, and writes an unnormalised partial; a second small kernel merges the
splits. The split count depends on shapes only (batch, kv heads, head dim, block-table width, the
GPU's SM count: one wave of programs, `target_programs`), so a decode step stays capturable in a CUDA
graph; splitting exists so that a single long sequence still fills the GPU. Each sequence divides its own
context over the splits at run time (whole 64-key steps), so a short one in a wide table is a chain of one or
two steps per program, not a long walk in one program.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hybridserve.kernels import pdl
from hybridserve.kernels.fused_triton import _rotate_half, _sm_count, arrival_counters
from hybridserve.kernels.paged_attention import write_kv  # noqa: F401  (one index_put per tensor: already one pass)

BLOCK_N = 64          # keys per inner step
TARGET_PROGRAMS = None  # (seq, kv head, split) programs a decode launches at most; None: one wave (below)
MIN_SPLIT = 64        # tokens: the most programs a sequence gets is its table width / MIN_SPLIT
NUM_WARPS = 4
PREFILL_ROWS = 64     # query rows (tokens × heads of one kv head) per prefill tile
PREFILL_SEQS = 128    # sequences whose query blocks a prefill program counts per vector load
LOG2E = 1.4426950408889634

@triton.jit
def _kv_tile(k_ptr, v_ptr, bt_row, tok, mt, hkv, sk_p, sk_t, sk_h, sv_p, sv_t, sv_h, rd, md, PAGE: tl.constexpr,
             F32_DOT: tl.constexpr, EV: tl.constexpr):
    """Keys and values [BN, BD] of tokens `tok` (mask mt) of one kv head, through the sequence's block table;
    EV: the loads' L2 eviction policy (KV_EVICT; "" the default)."""
    page = tl.load(bt_row + tok // PAGE, mask=mt, other=0).to(tl.int64)
    off = tok % PAGE
    mkv = mt[:, None] & md[None, :]
    k = tl.load(k_ptr + (page * sk_p + off * sk_t + hkv * sk_h)[:, None] + rd[None, :], mask=mkv, other=0.,
                eviction_policy=EV)
    v = tl.load(v_ptr + (page * sv_p + off * sv_t + hkv * sv_h)[:, None] + rd[None, :], mask=mkv, other=0.,
                eviction_policy=EV)
    if F32_DOT:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _norm_rope(x_ptr, heads, d, md, c, sn, nw_ptr, eps, NORM: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr,
               HALF: tl.constexpr):
    """Heads `heads` [R, 1] of one token's projection row (x_ptr) as fp32 [R, BD]: per-head RMSNorm (NORM,
    rounded to the row's dtype as the unfused norm stores it), then rotate-half RoPE on the first ROT dims
    (c, sn: [1, BD] cos/sin, 1/0 past ROT). As kernels/fused_triton.py's rope_write_kv computes it."""
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    m = md & (heads >= 0)
    x = tl.load(x_ptr + heads * D + d, mask=m, other=0.).to(tl.float32)
    xp = tl.load(x_ptr + heads * D + partner, mask=m & (d < ROT), other=0.).to(tl.float32)
    if NORM:
        r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
        x = (x * r * tl.load(nw_ptr + d, mask=md, other=0.).to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
        xp = (xp * r * tl.load(nw_ptr + partner, mask=d < ROT, other=0.).to(tl.float32)) \
            .to(x_ptr.dtype.element_ty).to(tl.float32)
    return _rotate_half(x, xp, c, sn, d, d < ROT, HALF)


@triton.jit
def _split_len(L, num_splits, BN: tl.constexpr):
    """Keys per split of a sequence of L keys: its context over the splits in whole BN steps (at least 1)."""
    return tl.maximum(tl.cdiv(tl.cdiv(L, num_splits), BN) * BN, 1)


@triton.jit
def _softmax_tile(q, k, v, mt, m, lsum, acc, scale_log2):
    """One k/v tile [BN, BD] (keys masked by mt) into the online softmax (max m, sum lsum, acc) of the queries q
    [BG, BD], in log2 units."""
    s = tl.dot(q.to(k.dtype), tl.trans(k)) * scale_log2              # [BG, BN]
    s = tl.where(mt[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m - m_new)
    return m_new, lsum * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, po_ptr, pm_ptr, pl_ptr, ek_ptr, ev_ptr,
                  o_ptr, lse_ptr, cnt_ptr, cos_ptr, sin_ptr, slot_ptr, qn_ptr, kn_ptr,
                  sq_b, sq_h, sk_p, sk_t, sk_h, sv_p, sv_t, sv_h, sbt_b, sek_b, sek_h, sev_b, sev_h, so_b, so_h,
                  sc_b, num_splits, scale_log2, eps,
                  H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr,
                  BD: tl.constexpr, PAGE: tl.constexpr, BN: tl.constexpr, ENTRY: tl.constexpr, FUSED: tl.constexpr,
                  BGM: tl.constexpr, BSC: tl.constexpr, WRITE_LSE: tl.constexpr, ROPE: tl.constexpr,
                  NORM_Q: tl.constexpr, NORM_K: tl.constexpr, ROT: tl.constexpr, HALF: tl.constexpr,
                  F32_DOT: tl.constexpr, IDLE_EXIT: tl.constexpr, KV_EARLY: tl.constexpr, EV: tl.constexpr,
                  PDL: tl.constexpr):
    b = tl.program_id(0)
    hkv = tl.program_id(1)
    sp = tl.program_id(2)
    rg = tl.arange(0, BG)
    rd = tl.arange(0, BD)
    rn = tl.arange(0, BN)
    mg = rg < G
    md = rd < D
    L = tl.load(len_ptr + b)
    split_len = _split_len(L, num_splits, BN)
    start = sp * split_len
    end = tl.minimum(start + split_len, L)
    used = tl.cdiv(L, split_len)                           # the splits holding keys
    run = start < L   # splits past the context do nothing; the merge reads only the used ones
    if ENTRY or FUSED:  # ... except split 0: it holds the extra entry / writes a row with nothing to attend to
        run = run | (sp == 0)
        used = tl.maximum(used, 1)
    # kernels/pdl.py: nothing but the step's sequence lengths (host-written before the step) is read before
    # the wait, so a program with no keys (at batch 1 most of the splits of a table as wide as the model's
    # context) leaves at once instead of holding an SM slot until the kernel before it has finished. H100,
    # decode graph at batch 1, three rounds in turn, leave vs wait (bench/results/decode_latency_idle_exit-h100.json):
    # NanoHammer 1.118 vs 1.120 ms, Kotodama-108M 0.615 vs 0.618, SmolLM2 0.520 vs 0.524, Kotodama-3B and
    # NeoLLM even.
    # The program holding the sequence's last key (this step's own, one per sequence and kv head) takes that key
    # into its softmax apart from its tile loop, which stops before it: from registers with RoPE inside, from the
    # cache after the wait with KV_EARLY.
    holder = sp == tl.maximum(used, 1) - 1
    own = L < 0                                           # none: the tile loop holds every key
    if ROPE or KV_EARLY:
        own = holder & (L > 0)
    end = tl.where(own, end - 1, end)
    bt_row = bt_ptr + b * sbt_b
    if KV_EARLY:      # the keys before this step's own are constant during the step: the first tile before the wait
        tok0 = start + rn
        mt0 = tok0 < end
        k0, v0 = _kv_tile(k_ptr, v_ptr, bt_row, tok0, mt0, hkv, sk_p, sk_t, sk_h, sv_p, sv_t, sv_h, rd, md, PAGE,
                          F32_DOT, EV)
        # and where the own key's slot is (the block table is the step's host-written metadata; a row with no keys
        # reads a slot it ignores)
        last = tl.maximum(L - 1, 0)
        own_page = tl.load(bt_row + last // PAGE).to(tl.int64)
        own_at = own_page * sk_p + (last % PAGE) * sk_t + hkv * sk_h
        own_v_at = own_page * sv_p + (last % PAGE) * sv_t + hkv * sv_h
    if PDL:
        if run or not IDLE_EXIT:
            pdl.enter(PDL)

    if ROPE:          # q_ptr is the step's raw q|k|v row: normalise / rotate here, write the token's k, v
        qrow = q_ptr + b.to(tl.int64) * sq_b
        c = tl.load(cos_ptr + b * sc_b + rd, mask=rd < ROT, other=1.).to(tl.float32)[None, :]
        sn = tl.load(sin_ptr + b * sc_b + rd, mask=rd < ROT, other=0.).to(tl.float32)[None, :]
        kh = tl.full([1, 1], H, tl.int32) + hkv
        k_new = _norm_rope(qrow, kh, rd[None, :], md[None, :], c, sn, kn_ptr, eps, NORM_K, D, ROT, HALF)
        k_new = k_new.to(k_ptr.dtype.element_ty)                       # as the cache holds them
        v_new = tl.load(qrow + (H + HKV + hkv) * D + rd, mask=md, other=0.).to(v_ptr.dtype.element_ty)
        if holder:                           # writes the token's k, v for later steps
            slot = tl.load(slot_ptr + b).to(tl.int64)
            tl.store(k_ptr + (slot * HKV + hkv) * D + rd[None, :], k_new, mask=md[None, :])
            tl.store(v_ptr + (slot * HKV + hkv) * D + rd, v_new, mask=md)
    elif KV_EARLY:    # the own key as rope_write_kv wrote it this step
        k_new = tl.load(k_ptr + own_at + rd[None, :], mask=md[None, :], other=0.)
        v_new = tl.load(v_ptr + own_v_at + rd, mask=md, other=0.)

    if run:
        if ROPE:
            heads = tl.where(mg, hkv * G + rg, -1)[:, None]
            q = _norm_rope(qrow, heads, rd[None, :], md[None, :], c, sn, qn_ptr, eps, NORM_Q, D, ROT, HALF)
            q = q.to(k_ptr.dtype.element_ty)
        else:
            q = tl.load(q_ptr + b * sq_b + (hkv * G + rg)[:, None] * sq_h + rd[None, :],
                        mask=mg[:, None] & md[None, :], other=0.)
        m = tl.full([BG], float("-inf"), tl.float32)
        l = tl.zeros([BG], dtype=tl.float32)
        acc = tl.zeros([BG, BD], dtype=tl.float32)
        if ENTRY:     # split 0 starts its online softmax from the sequence's extra key/value
            first = sp == 0
            ke = tl.load(ek_ptr + b * sek_b + hkv * sek_h + rd, mask=md, other=0.).to(tl.float32)
            ve = tl.load(ev_ptr + b * sev_b + hkv * sev_h + rd, mask=md, other=0.).to(tl.float32)
            se = tl.sum(q.to(tl.float32) * ke[None, :], axis=1) * scale_log2
            m = tl.where(first, se, m)
            l = tl.where(first, 1., l)
            acc = tl.where(first, acc + ve[None, :], acc)
        if ROPE or KV_EARLY:      # the token's own key/value into the softmax of the program holding it
            se = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), axis=1) * scale_log2
            m_own = tl.where(own, tl.maximum(m, se), m)
            alpha = tl.where(own, tl.exp2(m - m_own), 1.)
            p_own = tl.where(own, tl.exp2(se - m_own), 0.)
            l = l * alpha + p_own
            acc = acc * alpha[:, None] + p_own[:, None] * v_new.to(tl.float32)[None, :]
            m = m_own
        first = start
        if KV_EARLY:
            if start < end:
                m, l, acc = _softmax_tile(q, k0, v0, mt0, m, l, acc, scale_log2)
            first = start + BN
        for n0 in range(first, end, BN):
            tok = n0 + rn
            mt = tok < end
            k, v = _kv_tile(k_ptr, v_ptr, bt_row, tok, mt, hkv, sk_p, sk_t, sk_h, sv_p, sv_t, sv_h,
                            rd, md, PAGE, F32_DOT, EV)
            m, l, acc = _softmax_tile(q, k, v, mt, m, l, acc, scale_log2)

        direct = used < 0
        if FUSED:
            direct = used == 1
        if direct:              # the whole softmax is here: the output directly, no partials
            _write_out(o_ptr, lse_ptr, b, hkv * G + rg, mg, rd, md, so_b, so_h, m, l, acc, H, WRITE_LSE)
        else:
            row = (b * HKV * G + hkv * G + rg) * num_splits + sp
            tl.store(pm_ptr + row, m, mask=mg)
            tl.store(pl_ptr + row, l, mask=mg)
            tl.store(po_ptr + row[:, None] * D + rd[None, :], acc, mask=mg[:, None] & md[None, :])
            if FUSED:        # the last of the sequence's programs to finish merges all of them
                tl.debug_barrier()
                cnt = cnt_ptr + b * HKV + hkv
                if tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == used - 1:
                    _merge_splits(po_ptr, pm_ptr, pl_ptr, o_ptr, lse_ptr, b, hkv, used, num_splits, so_b, so_h,
                                  H, G, D, BD, BGM, BSC, WRITE_LSE)
                    tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")   # zero again for the next call


@triton.jit
def _write_out(o_ptr, lse_ptr, b, heads, mh, rd, md, so_b, so_h, m, l, acc, H: tl.constexpr,
               WRITE_LSE: tl.constexpr):
    """o = acc / l for query heads `heads` (mask mh) of sequence b; lse from (m, l) in log2 units."""
    l_safe = tl.where(l > 0, l, 1.)       # l == 0 only when nothing was attended to: o = 0
    o = acc / l_safe[:, None]
    tl.store(o_ptr + b * so_b + heads[:, None] * so_h + rd[None, :], o.to(o_ptr.dtype.element_ty),
             mask=mh[:, None] & md[None, :])
    if WRITE_LSE:
        lse = tl.where(l > 0, (m + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + b * H + heads, lse, mask=mh)


@triton.jit
def _merge_splits(po_ptr, pm_ptr, pl_ptr, o_ptr, lse_ptr, b, hkv, used, num_splits, so_b, so_h,
                  H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BGM: tl.constexpr,
                  BSC: tl.constexpr, WRITE_LSE: tl.constexpr):
    """The G query heads of kv head hkv from the `used` partials of sequence b, written out. The merge kernel
    calls it per query head (G = 1, hkv = the head)."""
    rg = tl.arange(0, BGM)
    rd = tl.arange(0, BD)
    M, Ls, acc = _merged(po_ptr, pm_ptr, pl_ptr, b, hkv, used, num_splits, H, G, D, BD, BGM, BSC)
    _write_out(o_ptr, lse_ptr, b, hkv * G + rg, rg < G, rd, rd < D, so_b, so_h, M, Ls, acc, H, WRITE_LSE)


@triton.jit
def _merged(po_ptr, pm_ptr, pl_ptr, b, hkv, used, num_splits, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
            BD: tl.constexpr, BGM: tl.constexpr, BSC: tl.constexpr):
    """(max, sum, unnormalised output) [BGM], [BGM], [BGM, BD] of the G query heads of kv head hkv, merged from
    the `used` partials of sequence b, BSC splits at a time (loaded past L1: other programs wrote them)."""
    rg = tl.arange(0, BGM)
    rs = tl.arange(0, BSC)
    rd = tl.arange(0, BD)
    mg = rg < G
    md = rd < D
    heads = hkv * G + rg
    base = (b * H + heads) * num_splits                                       # [BGM]
    M = tl.full([BGM], float("-inf"), tl.float32)
    Ls = tl.zeros([BGM], dtype=tl.float32)
    acc = tl.zeros([BGM, BD], dtype=tl.float32)
    for s0 in range(0, used, BSC):
        ms = (s0 + rs) < used
        row = base[None, :] + (s0 + rs)[:, None]                              # [BSC, BGM]
        mr = ms[:, None] & mg[None, :]
        pm = tl.load(pm_ptr + row, mask=mr, other=float("-inf"), cache_modifier=".cg")
        pl = tl.load(pl_ptr + row, mask=mr, other=0., cache_modifier=".cg")
        po = tl.load(po_ptr + row[:, :, None] * D + rd[None, None, :], mask=mr[:, :, None] & md[None, None, :],
                     other=0., cache_modifier=".cg")                          # [BSC, BGM, BD]
        m_new = tl.maximum(M, tl.max(pm, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0., m_new)
        w = tl.exp2(pm - m_use[None, :])
        alpha = tl.exp2(M - m_use)
        Ls = Ls * alpha + tl.sum(pl * w, axis=0)
        acc = acc * alpha[:, None] + tl.sum(po * w[:, :, None], axis=0)
        M = m_new
    return M, Ls, acc


@triton.jit
def _splits_used(len_ptr, b, num_splits, BN: tl.constexpr, ENTRY: tl.constexpr):
    """The split programs of sequence b that attended to something (split 0 always with an entry)."""
    L = tl.load(len_ptr + b)
    used = tl.cdiv(L, _split_len(L, num_splits, BN))
    if ENTRY:
        used = tl.maximum(used, 1)
    return used


@triton.jit
def _merge_kernel(po_ptr, pm_ptr, pl_ptr, o_ptr, lse_ptr, len_ptr, so_b, so_h, num_splits,
                  H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BSS: tl.constexpr, BSB: tl.constexpr,
                  BN: tl.constexpr, WRITE_LSE: tl.constexpr, ENTRY: tl.constexpr, PDL: tl.constexpr):
    """Query head h of sequence b from its used partials: BSS at a time when it uses no more than BSS (a short
    context in a table as wide as the model's), else BSB at a time (a whole tile of hundreds of splits spills
    registers)."""
    if PDL:   # kernels/pdl.py: nothing is read or written before the wait
        pdl.enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    used = _splits_used(len_ptr, b, num_splits, BN, ENTRY)
    if used <= BSS:
        _merge_splits(po_ptr, pm_ptr, pl_ptr, o_ptr, lse_ptr, b, h, used, num_splits, so_b, so_h,
                      H, 1, D, BD, 1, BSS, WRITE_LSE)
    else:
        _merge_splits(po_ptr, pm_ptr, pl_ptr, o_ptr, lse_ptr, b, h, used, num_splits, so_b, so_h,
                      H, 1, D, BD, 1, BSB, WRITE_LSE)

@triton.jit
def _query_block(cu_ptr, B, p, BM: tl.constexpr, SB: tl.constexpr):
    """The sequence b and first query m0 of flat query block p, where sequence b owns cdiv(q_len_b, BM)
    consecutive blocks; b = -1 past the last. The sequences' block counts are summed SB at a time from one
    vector load of cu_seqlens each (no dependent search), so an empty sequence owns no block."""
    b = p * 0 - 1
    m0 = p * 0
    base = p * 0
    for c0 in range(0, B, SB):
        idx = c0 + tl.arange(0, SB)
        ok = idx < B
        lo = tl.load(cu_ptr + idx, mask=ok, other=0)
        hi = tl.load(cu_ptr + idx + 1, mask=ok, other=0)
        nb = tl.where(ok, (hi - lo + BM - 1) // BM, 0)
        incl = tl.cumsum(nb, 0) + base
        hit = (incl - nb <= p) & (p < incl)
        b = tl.where(tl.sum(hit.to(tl.int32), 0) > 0, tl.sum(tl.where(hit, idx, 0), 0), b)
        m0 = tl.where(tl.sum(hit.to(tl.int32), 0) > 0, tl.sum(tl.where(hit, (p - incl + nb) * BM, 0), 0), m0)
        base += tl.sum(nb, 0)
    return b, m0


# The block-table row stride is the step's longest page list and B the step's sequence count: not specialised
# (1, a multiple of 16 or neither would each be a variant compiled while serving).
@triton.jit(do_not_specialize=["sbt_b", "B"])
def _prefill_kernel(q_ptr, k_ptr, v_ptr, cu_ptr, len_ptr, bt_ptr, o_ptr, lse_ptr, B,
                    sq_t, sq_h, sk_p, sk_t, sk_h, sv_p, sv_t, sv_h, sbt_b, so_t, so_h, scale_log2,
                    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, PAGE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, ROWS: tl.constexpr, WRITE_LSE: tl.constexpr,
                    F32_DOT: tl.constexpr, SB: tl.constexpr):
    """BM query tokens × the G query heads of one kv head form the BM·G rows of one tile, so each k/v
    tile is loaded once per G heads. Query i of a sequence sits at position seq_len − q_len + i. The grid's
    first axis runs over the step's query blocks, cdiv(T, BM) + B of them at most, whatever the lengths (a
    graph's grid comes from shapes; an empty or short sequence takes no idle programs)."""
    hkv = tl.program_id(1)
    b, m0 = _query_block(cu_ptr, B, tl.program_id(0), BM, SB)
    if b >= 0:
        bos = tl.load(cu_ptr + b)
        qlen = tl.load(cu_ptr + b + 1) - bos
        L = tl.load(len_ptr + b)
        rr = tl.arange(0, ROWS)                 # BM·G rows, padded to a power of two (G = 3, 5, ...)
        ri = m0 + rr // G                       # query index inside the sequence
        rh = hkv * G + rr % G                   # query head
        rd = tl.arange(0, BD)
        rn = tl.arange(0, BN)
        mr = (ri < qlen) & (rr < BM * G)
        md = rd < D
        qpos = L - qlen + ri
        tq = (bos + ri).to(tl.int64)
        q = tl.load(q_ptr + tq[:, None] * sq_t + rh[:, None] * sq_h + rd[None, :],
                    mask=mr[:, None] & md[None, :], other=0.)
        m = tl.full([ROWS], float("-inf"), tl.float32)
        l = tl.zeros([ROWS], dtype=tl.float32)
        acc = tl.zeros([ROWS, BD], dtype=tl.float32)
        end = tl.minimum(L, L - qlen + m0 + BM)   # one past the last key any row of this tile sees
        for n0 in range(0, end, BN):
            tok = n0 + rn
            mt = tok < end
            k, v = _kv_tile(k_ptr, v_ptr, bt_ptr + b * sbt_b, tok, mt, hkv, sk_p, sk_t, sk_h, sv_p, sv_t, sv_h,
                            rd, md, PAGE, F32_DOT, EV="")
            s = tl.dot(q.to(k.dtype), tl.trans(k)) * scale_log2
            s = tl.where(mt[None, :] & (tok[None, :] <= qpos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0., m_new)     # rows past qlen see no key
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m - m_use)
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        l_safe = tl.where(l > 0, l, 1.)
        o = acc / l_safe[:, None]
        tl.store(o_ptr + tq[:, None] * so_t + rh[:, None] * so_h + rd[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=mr[:, None] & md[None, :])
        if WRITE_LSE:
            lse = tl.where(l > 0, (m + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
            tl.store(lse_ptr + tq * H + rh, lse, mask=mr)


# Triton's CPU interpreter mis-computes tl.dot on bf16 operands (seen with triton 3.9): upcast there.
INTERPRETED = type(_split_kernel).__name__ == "InterpretedFunction"


def programs_per_sm(head_dim: int) -> int:
    """Split programs resident on one SM at once (registers bound them): 4 for heads of ≤ 64 dims, 3 above."""
    return 4 if head_dim <= 64 else 3


def target_programs(device: torch.device, head_dim: int) -> int:
    """The grid a decode fills: one wave of resident split programs, so that a long context's programs all run
    at once and none is left for a second, partly idle wave. H100 (bench/results/attention_splits-h100.json,
    split + merge over a 32k-key table, four head shapes × batch 1-64 × context 512-32k): 0.94 of a fixed
    1024-program grid's time (geometric mean; 0.75-1.07, the slower cases short contexts at ≤ 0.5 µs); whole
    decode step (decode_latency_wave-h100.json): NanoHammer at 32k keys, batch 8, 4.977 → 4.322 ms."""
    if TARGET_PROGRAMS:
        return TARGET_PROGRAMS
    if device.type != "cuda":
        return 132 * programs_per_sm(head_dim)      # the interpreter: an H100's grid, so tests split as there
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        * programs_per_sm(head_dim)


def num_splits_for(batch: int, kv_heads: int, max_tokens: int, target: int) -> int:
    """Programs per (sequence, kv head), from shapes alone (a graph replays one grid): split only while the
    grid (at most `target` programs) is too small to fill the GPU. Each sequence spreads its own context over
    them at run time in whole BLOCK_N steps, so a short context takes few programs and a long one all."""
    want = max(1, target // max(1, batch * kv_heads))
    return min(want, max(1, triton.cdiv(max_tokens, MIN_SPLIT)))

def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           seq_lens: torch.Tensor, scale: float, return_lse: bool = False,
           entry: tuple[torch.Tensor, torch.Tensor] | None = None):
    """q [B, H, D] (one token per sequence, already written to the cache); attends to the first
    seq_lens[b] tokens of the pages in block_tables[b], and to one extra key/value per sequence when `entry`
    = (k_e, v_e) [B, Hkv, D] is given (NanoHammer's state entry: split 0 seeds its softmax with it).
    Returns o [B, H, D] (and lse [B, H] fp32, natural log of the softmax normaliser, when return_lse). A
    row with nothing to attend to (seq_len 0, no entry) gets o = 0, lse = −inf.
    """
    assert q.stride(-1) == 1
    return _decode(q, q.shape[1], k_cache, v_cache, block_tables, seq_lens, scale, return_lse, entry, None)


def decode_step(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, k_cache: torch.Tensor,
                v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                scale: float, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                eps: float = 1e-5, entry: tuple[torch.Tensor, torch.Tensor] | None = None,
                return_lse: bool = False):
    """`rope_write_kv` then `decode` as one kernel: each program normalises / rotates its q heads from the
    raw projection qkv [B, H + 2·Hkv, D], and the program holding a sequence's last key writes the step's k, v
    to slot_mapping[b] for later steps and takes them into its softmax from registers (its tile loop stops
    before that key), so they need no separate kernel and no round trip before the attention. Returns
    o [B, H, D] (and lse)."""
    D = qkv.shape[-1]
    if qkv.stride(-1) != 1 or qkv.stride(1) != D:
        qkv = qkv.contiguous()
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and slot_mapping.shape[0] == qkv.shape[0]
    assert all(w is None or w.numel() == D for w in (q_norm, k_norm)), "QK-norm weights are per head"
    rope = (cos.contiguous(), sin.contiguous(), slot_mapping, q_norm, k_norm, eps)
    return _decode(qkv, num_heads, k_cache, v_cache, block_tables, seq_lens, scale, return_lse, entry, rope)


# The split programs merge their own partials (the last to finish a sequence's kv head, counted with an
# atomic) instead of a second kernel. Off: slower where measured (models/layers.py ATTN_STEP_FUSED has the
# numbers): the atomic and the re-read of the partials cost about what the merge kernel's boundary costs
# under PDL. An A/B knob.
FUSED_MERGE = False
MERGE_CHUNK = 8   # partials merged per step by that program
IDLE_EXIT = True  # split programs with no keys leave without waiting on the kernel before (an A/B knob)
# Each split program loads its first tile of cached keys and values (and the own key's page) before its PDL wait:
# they were written by earlier steps and do not change during this one, so their HBM latency could overlap the
# kernels before it; the step's own key, written this step, goes into the softmax on its own after the wait.
# Off: slower everywhere measured. H100 decode graphs, batch 1, context 128, on vs off in turn (bench/results/
# decode_latency_kv_early-h100.json, 3 rounds, own page read after the wait; decode_latency_kv_early_b-h100.json,
# 5 rounds, before): Llama-3.2-3B shapes 2.651 / 2.649 vs 2.622 / 2.623 ms, NanoHammer 1.119 / 1.117 vs
# 1.114 / 1.110, Kotodama-3B 2.627 / 2.623 vs 2.615 / 2.609, Kotodama-108M 0.621 / 0.619 vs 0.606 / 0.603;
# batch 8 0.1-0.7 % slower. An A/B knob (bench/decode_latency.py `kv_early`).
KV_EARLY = False
# The L2 eviction policy of the decode split's key/value loads ("": the default; "evict_last": a sequence's
# cached keys, read again by every step, stay in L2 before other lines). Even on an H100 at batch 1 / 8, context
# 128 and 4096, alone or with the weights' evict-first hint (bench/results/decode_latency_evict-h100.json,
# decode_latency_evict_4k-h100.json): once the weights leave L2 first, the keys stay anyway. An A/B knob
# (HYBRIDSERVE_KV_EVICT).
KV_EVICT = os.environ.get("HYBRIDSERVE_KV_EVICT", "")
MERGE_SMALL = 8        # partials the merge kernel takes in one small tile when a sequence uses no more ...
MERGE_CHUNK_BIG = 64   # ... else this many at a time


def decode_partials(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float, entry: tuple[torch.Tensor, torch.Tensor] | None = None):
    """`decode`'s split kernel alone: (po [B·H·S, D], pm, pl [B·H·S] fp32, S) for a kernel after it that merges
    the used splits of each (sequence, head) itself (`_splits_used`, `_merged`: kernels/attention_o_triton.py)."""
    assert q.stride(-1) == 1
    return _decode(q, q.shape[1], k_cache, v_cache, block_tables, seq_lens, scale, False, entry, None, merge=False)


def _decode(q, H, k_cache, v_cache, block_tables, seq_lens, scale, return_lse, entry, rope, merge=True):
    B, D = q.shape[0], q.shape[-1]
    num_pages, page, hkv, dk = k_cache.shape
    assert dk == D and H % hkv == 0, f"q {tuple(q.shape)} vs cache {tuple(k_cache.shape)}"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    G = H // hkv
    k_e, v_e = entry if entry is not None else (q, q)
    assert k_e.stride(-1) == 1 and v_e.stride(-1) == 1
    splits = num_splits_for(B, hkv, block_tables.shape[1] * page, target_programs(q.device, D))
    dev = q.device
    po = torch.empty(B * H * splits, D, dtype=torch.float32, device=dev)
    pm = torch.empty(B * H * splits, dtype=torch.float32, device=dev)
    pl = torch.empty(B * H * splits, dtype=torch.float32, device=dev)
    o = torch.empty(B, H, D, dtype=q.dtype, device=dev)
    lse = torch.empty(B, H, dtype=torch.float32, device=dev) if return_lse else pm
    fused = FUSED_MERGE and merge
    cnt = arrival_counters(dev, B * hkv) if fused else pm   # one per (sequence, kv head)
    cos, sin, slots, q_norm, k_norm, eps = rope if rope is not None else (q, q, seq_lens, None, None, 0.)
    rot = cos.shape[-1] if rope is not None else D
    BD = triton.next_power_of_2(D)
    if B:
        _split_kernel[(B, hkv, splits)](
            q, k_cache, v_cache, block_tables, seq_lens, po, pm, pl, k_e, v_e, o, lse, cnt, cos, sin, slots,
            q if q_norm is None else q_norm, q if k_norm is None else k_norm,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
            k_e.stride(0), k_e.stride(1), v_e.stride(0), v_e.stride(1), o.stride(0), o.stride(1),
            cos.stride(0), splits, scale * LOG2E, eps,
            H=H, HKV=hkv, G=G, BG=max(16, triton.next_power_of_2(G)), D=D, BD=BD, PAGE=page, BN=BLOCK_N,
            ENTRY=entry is not None, FUSED=fused, BGM=triton.next_power_of_2(G), BSC=MERGE_CHUNK,
            WRITE_LSE=return_lse, ROPE=rope is not None, NORM_Q=q_norm is not None, NORM_K=k_norm is not None,
            ROT=rot, HALF=rot // 2,
            F32_DOT=INTERPRETED, IDLE_EXIT=IDLE_EXIT, KV_EARLY=KV_EARLY, EV=KV_EVICT, num_warps=NUM_WARPS,
            **pdl.launch_kwargs(q.device, early=True))
        if not fused and merge:
            bs = triton.next_power_of_2(splits)
            _merge_kernel[(B, H)](po, pm, pl, o, lse, seq_lens, o.stride(0), o.stride(1), splits,
                                  H=H, D=D, BD=BD, BSS=min(bs, MERGE_SMALL), BSB=min(bs, MERGE_CHUNK_BIG),
                                  BN=BLOCK_N, WRITE_LSE=return_lse, ENTRY=entry is not None,
                                  **pdl.launch_kwargs(o.device, early=True))
    if not merge:
        return po, pm, pl, splits
    return (o, lse) if return_lse else o


@triton.jit
def _entry_merge_kernel(o_ptr, lse_ptr, q_ptr, k_ptr, v_ptr, out_ptr, so_t, so_h, sl_t, sq_t, sq_h, sk_t, sk_h,
                        sv_t, sv_h, scale, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BG: tl.constexpr,
                        BD: tl.constexpr, PDL: tl.constexpr):
    """One extra key/value per query merged into a finished attention result through its log-sum-exp."""
    if PDL:   # kernels/pdl.py: nothing is read or written before the wait
        pdl.enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    kh = tl.program_id(1)
    g = tl.arange(0, BG)
    d = tl.arange(0, BD)[None, :]
    mg = g < G
    md = d < D
    m = mg[:, None] & md
    hq = kh * G + g
    q = tl.load(q_ptr + t * sq_t + hq[:, None] * sq_h + d, mask=m, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + t * sk_t + kh * sk_h + d, mask=md, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + t * sv_t + kh * sv_h + d, mask=md, other=0.0).to(tl.float32)
    logit = tl.sum(q * k, axis=1) * scale
    lse = tl.load(lse_ptr + t * sl_t + hq, mask=mg, other=0.0)
    mx = tl.maximum(lse, logit)
    w_c = tl.exp(lse - mx)[:, None]
    w_s = tl.exp(logit - mx)[:, None]
    o = tl.load(o_ptr + t * so_t + hq[:, None] * so_h + d, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + (t * H + hq[:, None]) * D + d, ((w_c * o + w_s * v) / (w_c + w_s)).to(out_ptr.dtype.element_ty),
             mask=m)


def merge_entry(o_c: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k_s: torch.Tensor,
                v_s: torch.Tensor, scale: float) -> torch.Tensor:
    T, H, D = q.shape
    hkv = k_s.shape[1]
    assert all(t.stride(-1) == 1 for t in (o_c, q, k_s, v_s)) and lse.stride(-1) == 1
    out = torch.empty(T, H, D, dtype=o_c.dtype, device=o_c.device)
    if T:
        G = H // hkv
        _entry_merge_kernel[(T, hkv)](o_c, lse, q, k_s, v_s, out, o_c.stride(0), o_c.stride(1), lse.stride(0),
                                      q.stride(0), q.stride(1), k_s.stride(0), k_s.stride(1), v_s.stride(0),
                                      v_s.stride(1), scale, H=H, G=G, D=D, BG=triton.next_power_of_2(G),
                                      BD=triton.next_power_of_2(D), num_warps=1 if G * D <= 512 else 4,
                                      **pdl.launch_kwargs(out.device, early=True))
    return out


def varlen_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens: torch.Tensor,
                   seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, max_query_len: int,
                   return_lse: bool = False, entry: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Packed queries q [T, H, D] (their k/v already written to the cache); sequence b's queries are
    q[cu_seqlens[b]:cu_seqlens[b+1]] and attend causally to its first seq_lens[b] cached tokens (the
    prefix plus themselves), and each to its own extra key/value when `entry` = (k_e, v_e) [T, Hkv, D] is
    given (merged after, `merge_entry`). max_query_len (a host int) serves the reference; the grid comes
    from shapes alone. Returns o [T, H, D] (and lse [T, H] fp32 when return_lse, no entry)."""
    if entry is not None:
        assert not return_lse, "the log-sum-exp of attention with an entry is not provided here"
        o, lse = varlen_prefill(q, k_cache, v_cache, cu_seqlens, seq_lens, block_tables, scale, max_query_len, True)
        return merge_entry(o, lse, q, *entry, scale)
    T, H, D = q.shape
    num_pages, page, hkv, dk = k_cache.shape
    assert dk == D and H % hkv == 0, f"q {tuple(q.shape)} vs cache {tuple(k_cache.shape)}"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and q.stride(-1) == 1
    G = H // hkv
    BM = max(1, PREFILL_ROWS // G)
    B = seq_lens.shape[0]
    o = torch.empty_like(q)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device) if return_lse else o
    _prefill_kernel[(triton.cdiv(T, BM) + B, hkv)](
        q, k_cache, v_cache, cu_seqlens, seq_lens, block_tables, o, lse, B,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        o.stride(0), o.stride(1), scale * LOG2E,
        H=H, G=G, D=D, BD=triton.next_power_of_2(D), PAGE=page, BM=BM, BN=BLOCK_N,
        ROWS=max(16, triton.next_power_of_2(BM * G)), WRITE_LSE=return_lse, F32_DOT=INTERPRETED,
        SB=PREFILL_SEQS, num_warps=NUM_WARPS)
    return (o, lse) if return_lse else o
