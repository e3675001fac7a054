"""Triton form of `kernels/attention_o.py`: a decode step's QK-norm + RoPE + KV write, attention and o projection
in one kernel, where the unfused path runs four (rope_write_kv, the attention's split and merge, the o GEMV).

A program owns (sequence b, kv head g, a run of the o projection's rows). It loads its first weight tile before
its PDL wait; after it, it normalises and rotates q (the G query heads of g) and k from the step's projection
row, and the program with the first run writes k and v to the token's slot. The others keep them in registers:
every program attends over the whole context of its kv head itself (the step's own key first, then the
optional entry, then the cached keys in 64-key tiles), so no partials, merge or second kernel. Its G heads'
outputs, rounded as the attention stores them, then meet its rows' slice of the o weight [rows, G·D], and the
partial products are added into the fp32 output with relaxed atomics (the output must be zero before: the
caller's buffer). Each program reads its kv head's keys, so the KV bytes are read once per run of rows: for
short contexts (the batch-1 decode step at a few hundred keys), not long ones.

`decode_merged` keeps the attention's split kernel (kernels/paged_attention_triton.py `decode_partials`) and
replaces its merge kernel and the o GEMV with `_merge_o_kernel`: a program (sequence, kv head, run of o rows)
loads its first weight tile before its PDL wait, merges its kv head's used splits for the G query heads after
it, and adds its rows' products into the fp32 output the same way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridserve.kernels import pdl
from hybridserve.kernels.fused_triton import _sm_count
from hybridserve.kernels import paged_attention_triton as pat
from hybridserve.kernels.paged_attention_triton import (BLOCK_N, INTERPRETED, LOG2E, _kv_tile, _merged, _norm_rope,
                                                         _softmax_tile, _splits_used)

PROGRAMS_PER_SM = 2   # programs (sequence, kv head, row run) per SM
ROWS = 16             # o-projection rows per weight tile
NUM_WARPS = 4


@triton.jit
def _w_tile(w_ptr, N, r0, t, nblk, g, rr, rh, rd, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
            RB: tl.constexpr):
    """Tile t of a program's run: rows (r0 + t)·RB … of the o weight [N, H·D], columns of kv head g's query
    heads, as [RB, BGW, BD] (zeros past the run, the rows and the heads)."""
    rows = (r0 + t) * RB + rr
    cols = (g * G + rh)[:, None] * D + rd[None, :]
    mc = (rh < G)[:, None] & (rd < D)[None, :]
    m = ((rows < N) & (rr * 0 + t < nblk))[:, None, None] & mc[None, :, :]
    return tl.load(w_ptr + rows.to(tl.int64)[:, None, None] * (H * D) + cols[None, :, :], mask=m, other=0.0)


@triton.jit
def _o_start(w_ptr, N, C, H: tl.constexpr, G: tl.constexpr, BGW: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
             RB: tl.constexpr):
    """A program's (sequence b, kv head g, run of nblk o-row tiles from tile r0) place in the grid, its index
    ranges and its first weight tile."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    c = tl.program_id(2)
    nb = tl.cdiv(N, RB)
    r0 = c * nb // C
    nblk = (c + 1) * nb // C - r0
    rr = tl.arange(0, RB)
    rh = tl.arange(0, BGW)
    rd = tl.arange(0, BD)
    return b, g, r0, nblk, rr, rh, rd, _w_tile(w_ptr, N, r0, 0, nblk, g, rr, rh, rd, H, G, D, RB)


@triton.jit
def _attn_o_kernel(qkv_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, slot_ptr, ek_ptr,
                   ev_ptr, w_ptr, y_ptr, sq_b, sc_b, sk_p, sk_t, sk_h, sv_p, sv_t, sv_h, sbt_b, sek_b, sek_h,
                   sev_b, sev_h, N, C, scale_log2, eps,
                   H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, BG: tl.constexpr, BGW: tl.constexpr,
                   D: tl.constexpr, BD: tl.constexpr, PAGE: tl.constexpr, BN: tl.constexpr, ROT: tl.constexpr,
                   HALF: tl.constexpr, NORM_Q: tl.constexpr, NORM_K: tl.constexpr, ENTRY: tl.constexpr,
                   RB: tl.constexpr, F32_DOT: tl.constexpr, PDL: tl.constexpr):
    b, g, r0, nblk, rr, rh, rd, w = _o_start(w_ptr, N, C, H, G, BGW, D, BD, RB)    # weights: before the wait
    c = tl.program_id(2)
    md = rd < D
    L = tl.load(len_ptr + b)                                           # host-written before the step
    if PDL:
        pdl.enter(PDL)
    # the step's q (the G heads of kv head g), k and v, normalised / rotated as rope_write_kv leaves them
    qrow = qkv_ptr + b.to(tl.int64) * sq_b
    cs = tl.load(cos_ptr + b * sc_b + rd, mask=rd < ROT, other=1.).to(tl.float32)[None, :]
    sn = tl.load(sin_ptr + b * sc_b + rd, mask=rd < ROT, other=0.).to(tl.float32)[None, :]
    rg = tl.arange(0, BG)
    heads = tl.where(rg < G, g * G + rg, -1)[:, None]
    q = _norm_rope(qrow, heads, rd[None, :], md[None, :], cs, sn, qn_ptr, eps, NORM_Q, D, ROT, HALF)
    q = q.to(k_ptr.dtype.element_ty)                                   # [BG, BD]
    kh = tl.full([1, 1], H, tl.int32) + g
    k_new = _norm_rope(qrow, kh, rd[None, :], md[None, :], cs, sn, kn_ptr, eps, NORM_K, D, ROT, HALF)
    k_new = k_new.to(k_ptr.dtype.element_ty)                           # [1, BD]
    v_new = tl.load(qrow + (H + HKV + g) * D + rd[None, :], mask=md[None, :], other=0.).to(v_ptr.dtype.element_ty)
    if c == 0:        # one program per (sequence, kv head) writes the step's k and v to the token's slot
        slot = tl.load(slot_ptr + b).to(tl.int64)
        pg, off = slot // PAGE, slot % PAGE
        tl.store(k_ptr + pg * sk_p + off * sk_t + g * sk_h + rd[None, :], k_new, mask=md[None, :])
        tl.store(v_ptr + pg * sv_p + off * sv_t + g * sv_h + rd[None, :], v_new, mask=md[None, :])
    # online softmax in log2 units: the step's own key, the entry, then the cached keys 0 … L-2
    qf = q.to(tl.float32)
    m = tl.sum(qf * k_new.to(tl.float32), axis=1) * scale_log2         # [BG]
    lsum = tl.full([BG], 1.0, tl.float32)
    acc = tl.zeros([BG, BD], dtype=tl.float32) + v_new.to(tl.float32)
    if ENTRY:
        ke = tl.load(ek_ptr + b * sek_b + g * sek_h + rd, mask=md, other=0.).to(tl.float32)
        ve = tl.load(ev_ptr + b * sev_b + g * sev_h + rd, mask=md, other=0.).to(tl.float32)
        se = tl.sum(qf * ke[None, :], axis=1) * scale_log2
        m_new = tl.maximum(m, se)
        alpha = tl.exp2(m - m_new)
        pe = tl.exp2(se - m_new)
        lsum = lsum * alpha + pe
        acc = acc * alpha[:, None] + pe[:, None] * ve[None, :]
        m = m_new
    rn = tl.arange(0, BN)
    for n0 in range(0, L - 1, BN):
        tok = n0 + rn
        mt = tok < L - 1
        kt, vt = _kv_tile(k_ptr, v_ptr, bt_ptr + b * sbt_b, tok, mt, g, sk_p, sk_t, sk_h, sv_p, sv_t, sv_h, rd, md,
                          PAGE, F32_DOT, EV="")
        m, lsum, acc = _softmax_tile(q, kt, vt, mt, m, lsum, acc, scale_log2)
    o = (acc / lsum[:, None]).to(qkv_ptr.dtype.element_ty).to(tl.float32)     # as the attention stores its output
    o3 = tl.sum(tl.where(rg[:, None, None] == rh[None, :, None], o[:, None, :], 0.), axis=0)    # [BGW, BD]
    _o_rows(w, o3, w_ptr, y_ptr, b, N, r0, nblk, g, rr, rh, rd, H, G, D, RB)


@triton.jit
def _o_rows(w, o3, w_ptr, y_ptr, b, N, r0, nblk, g, rr, rh, rd, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
            RB: tl.constexpr):
    """A program's run of o-projection rows against its kv head's G outputs o3 [BGW, BD], the first tile w
    loaded: the partial products added into the fp32 output y [B, N] with relaxed atomics."""
    for t in range(0, nblk):
        w_next = _w_tile(w_ptr, N, r0, t + 1, nblk, g, rr, rh, rd, H, G, D, RB)    # out before this product
        part = tl.sum(tl.sum(w.to(tl.float32) * o3[None, :, :], axis=2), axis=1)
        rows = (r0 + t) * RB + rr
        tl.atomic_add(y_ptr + b * N + rows, part, mask=rows < N, sem="relaxed")
        w = w_next


@triton.jit
def _merge_o_kernel(po_ptr, pm_ptr, pl_ptr, len_ptr, w_ptr, y_ptr, num_splits, N, C,
                    H: tl.constexpr, G: tl.constexpr, BGW: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                    BN: tl.constexpr, BSC: tl.constexpr, ENTRY: tl.constexpr, RB: tl.constexpr, PDL: tl.constexpr):
    """Program (sequence b, kv head g, run c of o rows): g's G heads merged from the split kernel's partials,
    rounded as the attention stores its output, then `_o_rows`."""
    b, g, r0, nblk, rr, rh, rd, w = _o_start(w_ptr, N, C, H, G, BGW, D, BD, RB)    # weights: before the wait
    if PDL:
        pdl.enter(PDL)
    used = _splits_used(len_ptr, b, num_splits, BN, ENTRY)
    M, Ls, acc = _merged(po_ptr, pm_ptr, pl_ptr, b, g, used, num_splits, H, G, D, BD, BGW, BSC)
    o3 = (acc / tl.where(Ls > 0, Ls, 1.)[:, None]).to(w_ptr.dtype.element_ty).to(tl.float32)
    _o_rows(w, o3, w_ptr, y_ptr, b, N, r0, nblk, g, rr, rh, rd, H, G, D, RB)


def runs(batch: int, kv_heads: int, rows: int, device: torch.device, per_sm: int | None = None,
         tile_rows: int | None = None) -> int:
    """Row runs per (sequence, kv head): about PROGRAMS_PER_SM (per_sm) programs per SM in all."""
    sms = _sm_count(device.index if device.type == "cuda" else None)
    return max(1, min(triton.cdiv(rows, tile_rows or ROWS),
                      round((per_sm or PROGRAMS_PER_SM) * sms / max(1, batch * kv_heads))))


MERGED_PER_SM = 2   # decode_merged's programs (sequence, kv head, row run) per SM
MERGED_ROWS = 16    # ... and o-projection rows per weight tile
MERGED_CHUNK = 8    # partials merged per step


def decode_merged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, scale: float, o_weight: torch.Tensor, out: torch.Tensor,
                  entry: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """See kernels/attention_o.py: the attention's split kernel (kernels/paged_attention_triton.py), then
    `_merge_o_kernel` in place of its merge kernel and the o GEMV. `out` holds the unrounded fp32 sums."""
    B, H, D = q.shape
    hkv = k_cache.shape[2]
    N, W = o_weight.shape
    assert W == H * D and H % hkv == 0 and o_weight.is_contiguous()
    assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == (B, N)
    po, pm, pl, splits = pat.decode_partials(q, k_cache, v_cache, block_tables, seq_lens, scale, entry)
    C = runs(B, hkv, N, q.device, MERGED_PER_SM, MERGED_ROWS)
    if B:
        _merge_o_kernel[(B, hkv, C)](
            po, pm, pl, seq_lens, o_weight, out, splits, N, C, H=H, G=H // hkv,
            BGW=triton.next_power_of_2(H // hkv), D=D, BD=triton.next_power_of_2(D), BN=pat.BLOCK_N,
            BSC=MERGED_CHUNK, ENTRY=entry is not None, RB=MERGED_ROWS, num_warps=NUM_WARPS,
            **pdl.launch_kwargs(q.device, early=True))
    return out


def decode(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, k_cache: torch.Tensor,
           v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
           scale: float, o_weight: torch.Tensor, out: torch.Tensor, q_norm: torch.Tensor | None = None,
           k_norm: torch.Tensor | None = None, eps: float = 1e-5,
           entry: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """See kernels/attention_o.py. `out` holds the unrounded fp32 sums of the programs' partial products."""
    B, _, D = qkv.shape
    num_pages, page, hkv, dk = k_cache.shape
    N, W = o_weight.shape
    assert dk == D and W == num_heads * D and num_heads % hkv == 0 and o_weight.is_contiguous()
    assert qkv.stride(2) == 1 and qkv.stride(1) == D and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == (B, N)
    G = num_heads // hkv
    k_e, v_e = entry if entry is not None else (qkv, qkv)
    cos, sin = cos.contiguous(), sin.contiguous()
    rot = cos.shape[-1]
    C = runs(B, hkv, N, qkv.device)
    if B:
        _attn_o_kernel[(B, hkv, C)](
            qkv, cos, sin, q_norm if q_norm is not None else qkv, k_norm if k_norm is not None else qkv, k_cache,
            v_cache, block_tables, seq_lens, slot_mapping, k_e, v_e, o_weight, out, qkv.stride(0), cos.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2), block_tables.stride(0), k_e.stride(0), k_e.stride(1), v_e.stride(0), v_e.stride(1),
            N, C, scale * LOG2E, eps,
            H=num_heads, HKV=hkv, G=G, BG=max(16, triton.next_power_of_2(G)), BGW=triton.next_power_of_2(G), D=D,
            BD=triton.next_power_of_2(D), PAGE=page, BN=BLOCK_N, ROT=rot, HALF=rot // 2,
            NORM_Q=q_norm is not None, NORM_K=k_norm is not None, ENTRY=entry is not None, RB=ROWS,
            F32_DOT=INTERPRETED, num_warps=NUM_WARPS, **pdl.launch_kwargs(qkv.device))
    return out
