"""Triton attention over the paged KV cache, beside `kernels/paged_attention.py`.

`decode` is flash-decoding; `varlen_prefill` is causal flash attention of packed new tokens over each
sequence's pages (prefix + themselves), optionally with the log-sum-exp.

Decode: one query token per sequence. A program owns (sequence, kv head, split of the context): it loads each
k/v tile once for all G = H/Hkv query heads of that kv head (GQA packing, so KV bytes are read once, not
G times), keeps an online softmax, and writes an unnormalised partial; a second small kernel merges the
splits. The split count depends on shapes only (batch, kv heads, block-table width), so a decode step
stays capturable in a CUDA graph; splitting exists so that a single long sequence still fills the GPU.
Each sequence divides its own context over the splits at run time (whole 64-key steps), so a short one
in a wide table is a chain of one or two steps per program, not a long walk in one program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from hybridserve.kernels import pdl
from hybridserve.kernels.paged_attention import write_kv  # noqa: F401  (one index_put per tensor: already one pass)

BLOCK_N = 64          # keys per inner step
TARGET_PROGRAMS = 1024  # enough (seq, kv head, split) programs to fill 132 SMs several times over
MIN_SPLIT = 64        # tokens: the most programs a sequence gets is its table width / MIN_SPLIT
NUM_WARPS = 4
PREFILL_ROWS = 64     # query rows (tokens × heads of one kv head) per prefill tile
LOG2E = 1.4426950408889634

@triton.jit
def _kv_tile(k_ptr, v_ptr, bt_row, tok, mt, hkv, sk_p, sk_t, sk_h, sv_p, sv_t, sv_h, rd, md, PAGE: tl.constexpr,
             F32_DOT: tl.constexpr):
    """Keys and values [BN, BD] of tokens `tok` (mask mt) of one kv head, through the sequence's block table."""
    page = tl.load(bt_row + tok // PAGE, mask=mt, other=0).to(tl.int64)
    off = tok % PAGE
    mkv = mt[:, None] & md[None, :]
    k = tl.load(k_ptr + (page * sk_p + off * sk_t + hkv * sk_h)[:, None] + rd[None, :], mask=mkv, other=0.)
    v = tl.load(v_ptr + (page * sv_p + off * sv_t + hkv * sv_h)[:, None] + rd[None, :], mask=mkv, other=0.)
    if F32_DOT:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, po_ptr, pm_ptr, pl_ptr,
                  sq_b, sq_h, sk_p, sk_t, sk_h, sv_p, sv_t, sv_h, sbt_b, num_splits, scale_log2,
                  HKV: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                  PAGE: tl.constexpr, BN: tl.constexpr, F32_DOT: tl.constexpr, PDL: tl.constexpr):
    if PDL:   # kernels/pdl.py: nothing is read or written before the wait
        gdc_wait()
        gdc_launch_dependents()
    b = tl.program_id(0)
    hkv = tl.program_id(1)
    sp = tl.program_id(2)
    rg = tl.arange(0, BG)
    rd = tl.arange(0, BD)
    rn = tl.arange(0, BN)
    mg = rg < G
    md = rd < D
    L = tl.load(len_ptr + b)
    split_len = tl.cdiv(tl.cdiv(L, num_splits), BN) * BN   # this sequence's context over the splits
    start = sp * split_len
    end = tl.minimum(start + split_len, L)

    if start < L:     # splits past the context do nothing; the merge reads only the used ones
        q = tl.load(q_ptr + b * sq_b + (hkv * G + rg)[:, None] * sq_h + rd[None, :],
                    mask=mg[:, None] & md[None, :], other=0.)
        m = tl.full([BG], float("-inf"), tl.float32)
        l = tl.zeros([BG], dtype=tl.float32)
        acc = tl.zeros([BG, BD], dtype=tl.float32)
        for n0 in range(start, end, BN):
            tok = n0 + rn
            mt = tok < end
            k, v = _kv_tile(k_ptr, v_ptr, bt_ptr + b * sbt_b, tok, mt, hkv, sk_p, sk_t, sk_h, sv_p, sv_t, sv_h,
                            rd, md, PAGE, F32_DOT)
            s = tl.dot(q.to(k.dtype), tl.trans(k)) * scale_log2              # [BG, BN], log2 units
            s = tl.where(mt[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new

        row = (b * HKV * G + hkv * G + rg) * num_splits + sp
        tl.store(pm_ptr + row, m, mask=mg)
        tl.store(pl_ptr + row, l, mask=mg)
        tl.store(po_ptr + row[:, None] * D + rd[None, :], acc, mask=mg[:, None] & md[None, :])

@triton.jit
def _merge_kernel(po_ptr, pm_ptr, pl_ptr, o_ptr, lse_ptr, len_ptr, so_b, so_h, num_splits,
                  H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr,
                  WRITE_LSE: tl.constexpr, PDL: tl.constexpr):
    if PDL:   # kernels/pdl.py: nothing is read or written before the wait
        gdc_wait()
        gdc_launch_dependents()
    b = tl.program_id(0)
    h = tl.program_id(1)
    rs = tl.arange(0, BS)
    rd = tl.arange(0, BD)
    L = tl.load(len_ptr + b)
    ms = rs < tl.cdiv(L, tl.maximum(tl.cdiv(tl.cdiv(L, num_splits), BN) * BN, 1))   # the splits in use
    md = rd < D
    row = (b * H + h) * num_splits + rs
    m = tl.load(pm_ptr + row, mask=ms, other=float("-inf"))
    l = tl.load(pl_ptr + row, mask=ms, other=0.)
    part = tl.load(po_ptr + row[:, None] * D + rd[None, :], mask=ms[:, None] & md[None, :], other=0.)
    m_all = tl.max(m, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0., m_all)   # empty context: all weights 0, output 0
    w = tl.exp2(m - m_all)
    l_all = tl.sum(l * w, axis=0)
    l_safe = tl.where(l_all > 0, l_all, 1.)       # l_all == 0 only when every part is 0
    o = tl.sum(part * w[:, None], axis=0) / l_safe
    tl.store(o_ptr + b * so_b + h * so_h + rd, o.to(o_ptr.dtype.element_ty), mask=md)
    if WRITE_LSE:
        lse = tl.where(l_all > 0, (m_all + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(lse_ptr + b * H + h, lse)

@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, cu_ptr, len_ptr, bt_ptr, o_ptr, lse_ptr,
                    sq_t, sq_h, sk_p, sk_t, sk_h, sv_p, sv_t, sv_h, sbt_b, so_t, so_h, scale_log2,
                    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, PAGE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, ROWS: tl.constexpr, WRITE_LSE: tl.constexpr,
                    F32_DOT: tl.constexpr):
    """BM query tokens × the G query heads of one kv head form the BM·G rows of one tile, so each k/v
    tile is loaded once per G heads. Query i of a sequence sits at position seq_len − q_len + i."""
    b = tl.program_id(0)
    hkv = tl.program_id(2)
    bos = tl.load(cu_ptr + b)
    qlen = tl.load(cu_ptr + b + 1) - bos
    L = tl.load(len_ptr + b)
    m0 = tl.program_id(1) * BM
    if m0 < qlen:
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
                            rd, md, PAGE, F32_DOT)
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


def num_splits_for(batch: int, kv_heads: int, max_tokens: int) -> int:
    """Programs per (sequence, kv head), from shapes alone (a graph replays one grid): split only while the
    grid is too small to fill the GPU. Each sequence spreads its own context over them at run time in
    whole BLOCK_N steps, so a short context takes few programs and a long one all."""
    want = max(1, TARGET_PROGRAMS // max(1, batch * kv_heads))
    return min(want, max(1, triton.cdiv(max_tokens, MIN_SPLIT)))

def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           seq_lens: torch.Tensor, scale: float, return_lse: bool = False):
    """q [B, H, D] (one token per sequence, already written to the cache); attends to the first
    seq_lens[b] tokens of the pages in block_tables[b]. Returns o [B, H, D] (and lse [B, H] fp32,
    natural log of the softmax normaliser, when return_lse). A row with seq_len 0 gets o = 0, lse = −inf.
    """
    B, H, D = q.shape
    num_pages, page, hkv, dk = k_cache.shape
    assert dk == D and H % hkv == 0, f"q {tuple(q.shape)} vs cache {tuple(k_cache.shape)}"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and q.stride(-1) == 1
    G = H // hkv
    splits = num_splits_for(B, hkv, block_tables.shape[1] * page)
    dev = q.device
    po = torch.empty(B * H * splits, D, dtype=torch.float32, device=dev)
    pm = torch.empty(B * H * splits, dtype=torch.float32, device=dev)
    pl = torch.empty(B * H * splits, dtype=torch.float32, device=dev)
    BD = triton.next_power_of_2(D)
    _split_kernel[(B, hkv, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, po, pm, pl,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        splits, scale * LOG2E,
        HKV=hkv, G=G, BG=max(16, triton.next_power_of_2(G)), D=D, BD=BD, PAGE=page, BN=BLOCK_N,
        F32_DOT=INTERPRETED, num_warps=NUM_WARPS, **pdl.launch_kwargs(q.device))
    o = torch.empty_like(q)
    lse = torch.empty(B, H, dtype=torch.float32, device=dev) if return_lse else pm
    _merge_kernel[(B, H)](po, pm, pl, o, lse, seq_lens, o.stride(0), o.stride(1), splits,
                          H=H, D=D, BD=BD, BS=triton.next_power_of_2(splits), BN=BLOCK_N, WRITE_LSE=return_lse,
                          **pdl.launch_kwargs(o.device))
    return (o, lse) if return_lse else o


def varlen_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens: torch.Tensor,
                   seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, max_query_len: int,
                   return_lse: bool = False):
    """Packed queries q [T, H, D] (their k/v already written to the cache); sequence b's queries are
    q[cu_seqlens[b]:cu_seqlens[b+1]] and attend causally to its first seq_lens[b] cached tokens (the
    prefix plus themselves). max_query_len (a host int) sizes the grid. Returns o [T, H, D] (and lse
    [T, H] fp32 when return_lse)."""
    T, H, D = q.shape
    num_pages, page, hkv, dk = k_cache.shape
    assert dk == D and H % hkv == 0, f"q {tuple(q.shape)} vs cache {tuple(k_cache.shape)}"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and q.stride(-1) == 1
    G = H // hkv
    BM = max(1, PREFILL_ROWS // G)
    B = seq_lens.shape[0]
    o = torch.empty_like(q)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device) if return_lse else o
    _prefill_kernel[(B, triton.cdiv(max(max_query_len, 1), BM), hkv)](
        q, k_cache, v_cache, cu_seqlens, seq_lens, block_tables, o, lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        o.stride(0), o.stride(1), scale * LOG2E,
        H=H, G=G, D=D, BD=triton.next_power_of_2(D), PAGE=page, BM=BM, BN=BLOCK_N,
        ROWS=max(16, triton.next_power_of_2(BM * G)), WRITE_LSE=return_lse, F32_DOT=INTERPRETED, num_warps=NUM_WARPS)
    return (o, lse) if return_lse else o
