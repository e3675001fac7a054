"""Triton kernels for the short causal depthwise conv + SiLU, same contract as `kernels/short_conv.py`.

y_t[c] = silu( Σ_j W[c, j] · u_{t−K+1+j}[c] ), with W[c, K−1] on the current token. Inputs before a
sequence's first new token come from its slot window conv_pool[slot] ([C, K−1], oldest column first),
which is then advanced to the last K−1 inputs.

The window is read and rewritten in place by the same program; a block barrier between the loads and
the stores keeps one thread's store from overtaking another thread's load of the same column.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

DECODE_BC = 256
PREFILL_BT = 16
PREFILL_BC = 128


@triton.jit
def _decode_kernel(x_ptr, w_ptr, pool_ptr, slot_ptr, y_ptr, sx_b, sy_b,
                   C: tl.constexpr, K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    b = tl.program_id(0)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    rj = tl.arange(0, BK)
    mc = rc < C
    slot = tl.load(slot_ptr + b).to(tl.int64)
    win_ptr = pool_ptr + slot * C * (K - 1) + rc[:, None] * (K - 1)

    x = tl.load(x_ptr + b * sx_b + rc, mask=mc, other=0.)
    past = tl.load(win_ptr + rj[None, :], mask=mc[:, None] & (rj[None, :] < K - 1), other=0.)
    full = tl.where(rj[None, :] == K - 1, x[:, None], past)          # [BC, BK]: window ++ x
    w = tl.load(w_ptr + rc[:, None] * K + rj[None, :], mask=mc[:, None] & (rj[None, :] < K), other=0.)
    acc = tl.sum(full.to(tl.float32) * w.to(tl.float32), axis=1)
    y = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b * sy_b + rc, y.to(y_ptr.dtype.element_ty), mask=mc)

    shifted = tl.load(win_ptr + rj[None, :] + 1, mask=mc[:, None] & (rj[None, :] + 1 < K - 1), other=0.)
    shifted = tl.where(rj[None, :] == K - 2, x[:, None], shifted)
    tl.debug_barrier()
    tl.store(win_ptr + rj[None, :], shifted.to(pool_ptr.dtype.element_ty),
             mask=mc[:, None] & (rj[None, :] < K - 1))


@triton.jit(do_not_specialize=["T"])   # the step's token count: one variant for all
def _prefill_conv_kernel(x_ptr, w_ptr, pool_ptr, slot_ptr, cu_ptr, seq_ptr, y_ptr, sx_t, sy_t,
                         T, C: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Token-parallel: each tap is one [BT, BC] load, from x or, before the sequence start, the window."""
    rt = tl.program_id(0) * BT + tl.arange(0, BT)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    mt = rt < T
    mc = rc < C
    n = tl.load(seq_ptr + rt, mask=mt, other=0)
    bos = tl.load(cu_ptr + n, mask=mt, other=0)
    slot = tl.load(slot_ptr + n, mask=mt, other=0).to(tl.int64)
    pos = rt - bos
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(K):
        src = pos - (K - 1) + j                                           # position inside the sequence
        in_x = (src >= 0)[:, None] & mt[:, None] & mc[None, :]
        in_w = (src < 0)[:, None] & mt[:, None] & mc[None, :]
        xv = tl.load(x_ptr + (rt + j - (K - 1)).to(tl.int64)[:, None] * sx_t + rc[None, :], mask=in_x, other=0.)
        wv = tl.load(pool_ptr + slot[:, None] * C * (K - 1) + rc[None, :] * (K - 1) + (K - 1 + src)[:, None],
                     mask=in_w, other=0.)
        wj = tl.load(w_ptr + rc * K + j, mask=mc, other=0.).to(tl.float32)
        acc += (xv.to(tl.float32) + wv.to(tl.float32)) * wj[None, :]
    y = acc * tl.sigmoid(acc)
    tl.store(y_ptr + rt.to(tl.int64)[:, None] * sy_t + rc[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mt[:, None] & mc[None, :])


@triton.jit
def _prefill_window_kernel(x_ptr, pool_ptr, slot_ptr, cu_ptr, sx_t,
                           C: tl.constexpr, K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """New window column j = input at position L−(K−1)+j: from x if ≥ 0, else old column L+j."""
    n = tl.program_id(0)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    rj = tl.arange(0, BK)
    mc = rc < C
    slot = tl.load(slot_ptr + n).to(tl.int64)
    bos = tl.load(cu_ptr + n)
    L = tl.load(cu_ptr + n + 1) - bos
    if L <= 0:            # no input: the window stays
        return
    src = L - (K - 1) + rj
    m = mc[:, None] & (rj < K - 1)[None, :]
    win_ptr = pool_ptr + slot * C * (K - 1) + rc[:, None] * (K - 1)
    xv = tl.load(x_ptr + (bos + src).to(tl.int64)[None, :] * sx_t + rc[:, None], mask=m & (src >= 0)[None, :],
                 other=0.)
    old = tl.load(win_ptr + (K - 1 + src)[None, :], mask=m & (src < 0)[None, :], other=0.)
    new = tl.where((src >= 0)[None, :], xv.to(pool_ptr.dtype.element_ty), old)
    tl.debug_barrier()
    tl.store(win_ptr + rj[None, :], new, mask=m)


def _check(x, weight, conv_pool):
    C, K = weight.shape
    assert K >= 2, "conv width must be at least 2"
    assert x.shape[-1] == C and x.stride(-1) == 1, "x: [·, C], channels contiguous"
    assert conv_pool.is_contiguous() and tuple(conv_pool.shape[1:]) == (C, K - 1), \
        f"conv pool {tuple(conv_pool.shape)} vs (·, {C}, {K - 1})"
    return C, K, weight.contiguous()


def decode_step(x: torch.Tensor, weight: torch.Tensor, conv_pool: torch.Tensor,
                slot_ids: torch.Tensor) -> torch.Tensor:
    """x [B, C] one new input per row; returns y [B, C]; advances conv_pool[slot_ids] in place."""
    C, K, weight = _check(x, weight, conv_pool)
    B = x.shape[0]
    y = torch.empty_like(x)
    BC = min(DECODE_BC, triton.next_power_of_2(C))
    _decode_kernel[(B, triton.cdiv(C, BC))](x, weight, conv_pool, slot_ids, y, x.stride(0), y.stride(0),
                                          C=C, K=K, BC=BC, BK=triton.next_power_of_2(K))
    return y


def varlen_prefill(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor, conv_pool: torch.Tensor,
                   slot_ids: torch.Tensor) -> torch.Tensor:
    """x [T, C] packed; returns y [T, C]; each sequence continues from and advances its slot window.

    Two launches (conv, then window update) so no program reads a window another program rewrote.
    """
    C, K, weight = _check(x, weight, conv_pool)
    T = x.shape[0]
    N = slot_ids.shape[0]
    y = torch.empty_like(x)
    cu = cu_seqlens.to(torch.int32)
    tok = torch.arange(T, device=x.device, dtype=torch.int32)
    seq = (torch.searchsorted(cu, tok, right=True) - 1).to(torch.int32)
    BC = min(PREFILL_BC, triton.next_power_of_2(C))
    if T > 0:
        _prefill_conv_kernel[(triton.cdiv(T, PREFILL_BT), triton.cdiv(C, BC))](
            x, weight, conv_pool, slot_ids, cu, seq, y, x.stride(0), y.stride(0), T,
            C=C, K=K, BT=PREFILL_BT, BC=BC)
    _prefill_window_kernel[(N, triton.cdiv(C, BC))](x, conv_pool, slot_ids, cu, x.stride(0),
                                                  C=C, K=K, BC=BC, BK=triton.next_power_of_2(K - 1))
    return y
