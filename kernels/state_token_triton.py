"""Triton kernels for NanoHammer's per-step state path, beside `kernels/state_token.py`.

A decode step of NanoHammer rebuilds every layer's state entry from I, so in plain PyTorch its prologue
alone is ~200 tiny kernels (rotations, 16 Euler cells, norms) and each layer adds ~15 more for the state
entry's norm, projection and log-sum-exp merge. Here:

- `decode_readout`: (the projection's bias added,) rotate, integrate in the slot and read back, one kernel;
- `decode_state_chain`: a decode step's chain. At one row the readout runs inside the first two cell
  kernels (each program forms the whole s^0 row it needs; the second copies the new I into the slot, which
  the first reads) and each layer's folded GEMV in the cell kernel that finishes its s^l (extra programs),
  so with a token table the chain to layer 0's entry is 4 kernels (cell, fc2, cell + fold, epilogue), not 7;
- `state_cell_steps`: two kernels per cell. Kernel A finishes cell l−1 (residual, α already applied,
  PostNorm) in its prologue, then runs PreNorm → fc1 → SiLU of cell l; kernel B is fc2 with α in its
  epilogue. The prologue needs whole state rows (512 wide), which every program recomputes; that is
  cheaper than a launch. Each s^l is yielded as soon as the kernel writing it is queued;
- `state_inputs`: the norm of a layer's state entries (their projection's bias added first), the input
  of the entries' k/v projection (the unfolded chain);
- `folded_entry`: the folded chain's epilogue (kernels/state_token.py): after one GEMV of s^l against the
  layer's folded weight, the norm's scale from its quadratic form, the bias and the keys' RoPE, one kernel.
The entries then join the attention as one extra key each (kernels/paged_attention_triton.py).

The integral for packed prefill chunks and the holographic rotations themselves stay the references.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from hybridserve.kernels import pdl
from hybridserve.kernels.fused_triton import _rotate_half
from hybridserve.kernels.state_token import (HOLO_BASE, decode_integral, fold_entry_weights,  # noqa: F401
                                             holo_rope, holo_rope_inv, holo_theta, integral_reference,
                                             state_logit, token_state_table, varlen_integral)

# (rows, fc1 outputs, fc2 outputs, fc2 K block) per program. Many rows: tensor-core tiles (tl.dot needs
# >= 16 per dim). One row (a decode step of batch 1): a GEMV with narrow tiles, so that 128 programs
# share each weight instead of 32 latency-bound ones.
CELL_TILES = (16, 32, 16, 128)
CELL_GEMV_TILES = (1, 8, 4, 512)

# `decode_state_chain` runs each layer's folded GEMV in its cell kernel up to this many rows; above, it yields
# None for it and the caller runs the GEMV. NanoHammer-1.5B on an H100, batch 8: in the cell kernels 1.361 ms,
# on their own 1.347 (bench/results/decode_latency_chain3-h100.json; batch 1 is in the cells either way).
FOLD_IN_CELL_ROWS = 1


@triton.jit
def _readout_tile(x_ptr, xi_ptr, xb_ptr, pos_ptr, theta_ptr, pool_ptr, slot_ptr, sx, rows, mr, cols, mc,
                  S: tl.constexpr, GATHER: tl.constexpr, HAS_XB: tl.constexpr):
    """The integral step of rows `rows` [BM] over state columns `cols` [BS]: w = x[xi[row]] (or x[row]) plus
    the bias xb, I = pool[slot] + HoloRoPE(w, t), s^0 = HoloRoPE^{-1}(I, t). Returns (s^0, I) [BM, BS] fp32 in
    the state's own interleaved layout: each column computes its complex pair, so a program holds whole rows."""
    m = mr[:, None] & mc[None, :]
    j = cols // 2
    even = (cols % 2 == 0)[None, :]
    if GATHER:
        src = tl.load(xi_ptr + rows, mask=mr, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    wa = tl.load(x_ptr + src[:, None] * sx + 2 * j[None, :], mask=m, other=0.0).to(tl.float32)
    wb = tl.load(x_ptr + src[:, None] * sx + 2 * j[None, :] + 1, mask=m, other=0.0).to(tl.float32)
    if HAS_XB:
        wa += tl.load(xb_ptr + 2 * j, mask=mc, other=0.0).to(tl.float32)[None, :]
        wb += tl.load(xb_ptr + 2 * j + 1, mask=mc, other=0.0).to(tl.float32)[None, :]
    # angle formed and range-reduced in fp64 (t·θ reaches ~1.3e5 rad), then cos/sin in fp32
    two_pi = tl.full((), 6.283185307179586, tl.float64)
    ang = tl.load(pos_ptr + rows, mask=mr, other=0).to(tl.float64)[:, None] \
        * tl.load(theta_ptr + j, mask=mc, other=0.0)[None, :]
    ang = (ang - (ang / two_pi).to(tl.int64).to(tl.float64) * two_pi).to(tl.float32)   # t, θ >= 0
    c, sn = tl.cos(ang), tl.sin(ang)
    slot = tl.load(slot_ptr + rows, mask=mr, other=0).to(tl.int64)
    ia = tl.load(pool_ptr + slot[:, None] * S + 2 * j[None, :], mask=m, other=0.0) + (wa * c - wb * sn)
    ib = tl.load(pool_ptr + slot[:, None] * S + 2 * j[None, :] + 1, mask=m, other=0.0) + (wa * sn + wb * c)
    return tl.where(even, ia * c + ib * sn, ib * c - ia * sn), tl.where(even, ia, ib)


@triton.jit
def _readout_kernel(w_ptr, wi_ptr, bias_ptr, pos_ptr, theta_ptr, pool_ptr, slot_ptr, s_ptr, sw,
                    S: tl.constexpr, BS: tl.constexpr, GATHER: tl.constexpr, HAS_BIAS: tl.constexpr,
                    PDL: tl.constexpr):
    if PDL:   # kernels/pdl.py: nothing is read or written before the wait
        pdl.enter(PDL)
    rows = tl.program_id(0) + tl.arange(0, 1)
    cols = tl.arange(0, BS)
    mr = rows >= 0
    mc = cols < S
    s, integ = _readout_tile(w_ptr, wi_ptr, bias_ptr, pos_ptr, theta_ptr, pool_ptr, slot_ptr, sw, rows, mr, cols, mc,
                             S=S, GATHER=GATHER, HAS_XB=HAS_BIAS)
    m = mr[:, None] & mc[None, :]
    slot = tl.load(slot_ptr + rows).to(tl.int64)
    tl.store(pool_ptr + slot[:, None] * S + cols[None, :], integ, mask=m)
    tl.store(s_ptr + rows[:, None].to(tl.int64) * S + cols[None, :], s, mask=m)


def decode_readout(w: torch.Tensor, positions: torch.Tensor, theta: torch.Tensor, state_pool: torch.Tensor,
                   slot_ids: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _readout(w, None, bias, positions, theta, state_pool, slot_ids)


def _readout(x: torch.Tensor, x_rows: torch.Tensor | None, bias: torch.Tensor | None, positions: torch.Tensor,
             theta: torch.Tensor, state_pool: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """`decode_readout` of w = x[x_rows] (x itself when x_rows is None), one program per row."""
    B, S = positions.shape[0], x.shape[-1]
    assert state_pool.is_contiguous() and state_pool.dtype == torch.float32
    if x.stride(-1) != 1:
        x = x.contiguous()
    s = torch.empty(B, S, dtype=torch.float32, device=x.device)
    if B:
        _readout_kernel[(B,)](x, x if x_rows is None else x_rows, x if bias is None else bias, positions, theta,
                              state_pool, slot_ids, s, x.stride(0), S=S, BS=triton.next_power_of_2(S),
                              GATHER=x_rows is not None, HAS_BIAS=bias is not None, num_warps=1 if S <= 1024 else 4,
                              **pdl.launch_kwargs(s.device))
    return s


@triton.jit
def _rows_dot(x, w_ptr, n, mn, cols, mc, S: tl.constexpr, BM: tl.constexpr, F32_DOT: tl.constexpr,
              PREC: tl.constexpr):
    """x [BM, BS] (the weights' dtype) times rows n of w [*, S] (row-major) transposed: [BM, BN] fp32."""
    w = tl.load(w_ptr + n[None, :] * S + cols[:, None], mask=mc[:, None] & mn[None, :], other=0.0)
    if BM == 1:
        return tl.sum(tl.trans(x).to(tl.float32) * w.to(tl.float32), axis=0)[None, :]
    if F32_DOT:
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    return tl.dot(x, w, input_precision=PREC)


@triton.jit
def _cell_in_kernel(s_ptr, u_ptr, post_ptr, pre_ptr, w1_ptr, b1_ptr, chain_ptr, out_ptr, h1_ptr, f_ptr, fo_ptr,
                    x_ptr, xi_ptr, xb_ptr, pos_ptr, theta_ptr, pool_ptr, slot_ptr, integ_ptr, sx, T, eps,
                    S: tl.constexpr, I: tl.constexpr, R: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, BF: tl.constexpr, NM: tl.constexpr,
                    HAS_PREV: tl.constexpr, HAS_MLP: tl.constexpr, HAS_B1: tl.constexpr, HAS_FOLD: tl.constexpr,
                    READOUT: tl.constexpr, GATHER: tl.constexpr, HAS_XB: tl.constexpr,
                    F32_DOT: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr):
    """Finish the previous cell (s = PostNorm(s + u), stored once by the programs of column block 0),
    then, in programs pn < NM, h1 = SiLU(fc1(PreNorm(s)) + b1) for this program's BN hidden units; in
    programs pn >= NM (HAS_FOLD), BF rows of the finished s against the layer's folded entry weight.
    READOUT 1: s is not loaded but formed by the integral step (`_readout_tile`), stored by column block 0
    with the new I (not yet in the slots, which every program reads); READOUT 2: column block 0 copies
    that I into the slots (no program of this kernel reads them)."""
    if PDL:   # kernels/pdl.py: nothing is read or written before the wait
        pdl.enter(PDL)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    pn = tl.program_id(1)
    cols = tl.arange(0, BS)
    mr = rows < T
    mc = cols < S
    m = mr[:, None] & mc[None, :]
    off = rows[:, None].to(tl.int64) * S + cols[None, :]
    if READOUT == 1:
        s, integ = _readout_tile(x_ptr, xi_ptr, xb_ptr, pos_ptr, theta_ptr, pool_ptr, slot_ptr, sx, rows, mr, cols,
                                 mc, S=S, GATHER=GATHER, HAS_XB=HAS_XB)
        if pn == 0:
            tl.store(s_ptr + off, s, mask=m)
            tl.store(integ_ptr + off, integ, mask=m)
    else:
        s = tl.load(s_ptr + off, mask=m, other=0.0)
    if READOUT == 2:
        if pn == 0:
            slot = tl.load(slot_ptr + rows, mask=mr, other=0).to(tl.int64)
            tl.store(pool_ptr + slot[:, None] * S + cols[None, :], tl.load(integ_ptr + off, mask=m, other=0.0),
                     mask=m)
    if HAS_PREV:
        s += tl.load(u_ptr + off, mask=m, other=0.0)
        s = s * tl.rsqrt(tl.sum(s * s, axis=1) / S + eps)[:, None] \
            * tl.load(post_ptr + cols, mask=mc, other=0.0).to(tl.float32)[None, :]
        if pn == 0:
            tl.store(chain_ptr + off, s, mask=m)
            tl.store(out_ptr + off, s.to(out_ptr.dtype.element_ty), mask=m)
    if pn < NM:
        if HAS_MLP:
            x = s * tl.rsqrt(tl.sum(s * s, axis=1) / S + eps)[:, None] \
                * tl.load(pre_ptr + cols, mask=mc, other=0.0).to(tl.float32)[None, :]
            n = pn * BN + tl.arange(0, BN)
            mn = n < I
            acc = _rows_dot(x.to(w1_ptr.dtype.element_ty), w1_ptr, n, mn, cols, mc, S=S, BM=BM, F32_DOT=F32_DOT,
                            PREC=PREC)
            if HAS_B1:
                acc += tl.load(b1_ptr + n, mask=mn, other=0.0).to(tl.float32)[None, :]
            acc = acc.to(h1_ptr.dtype.element_ty).to(tl.float32)     # the projection's stored output, as the reference
            acc = acc / (1.0 + tl.exp(-acc))
            tl.store(h1_ptr + rows[:, None] * I + n[None, :], acc.to(h1_ptr.dtype.element_ty),
                     mask=mr[:, None] & mn[None, :])
    elif HAS_FOLD:
        n = (pn - NM) * BF + tl.arange(0, BF)
        mn = n < R
        acc = _rows_dot(s.to(f_ptr.dtype.element_ty), f_ptr, n, mn, cols, mc, S=S, BM=BM, F32_DOT=F32_DOT, PREC=PREC)
        tl.store(fo_ptr + rows[:, None].to(tl.int64) * R + n[None, :], acc.to(fo_ptr.dtype.element_ty),
                 mask=mr[:, None] & mn[None, :])


@triton.jit
def _cell_out_kernel(h1_ptr, w2_ptr, b2_ptr, a_ptr, u_ptr, T,
                     S: tl.constexpr, I: tl.constexpr, HS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, HAS_B2: tl.constexpr, F32_DOT: tl.constexpr, PREC: tl.constexpr,
                     PDL: tl.constexpr):
    """u = α[head] · (fc2(h1) + b2) for this program's BN state dims (fp32)."""
    if PDL:   # kernels/pdl.py: nothing is read or written before the wait
        pdl.enter(PDL)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    mr = rows < T
    mn = n < S
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, I, BK):
        kk = k0 + tl.arange(0, BK)
        mk = kk < I
        a = tl.load(h1_ptr + rows[:, None].to(tl.int64) * I + kk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        w = tl.load(w2_ptr + n[None, :] * I + kk[:, None], mask=mk[:, None] & mn[None, :], other=0.0)
        if BM == 1:
            acc += tl.sum(tl.trans(a).to(tl.float32) * w.to(tl.float32), axis=0)[None, :]
        else:
            if F32_DOT:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc += tl.dot(a, w, input_precision=PREC)
    if HAS_B2:
        acc += tl.load(b2_ptr + n, mask=mn, other=0.0).to(tl.float32)[None, :]
    acc = acc.to(h1_ptr.dtype.element_ty).to(tl.float32) \
        * tl.load(a_ptr + n // HS, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(u_ptr + rows[:, None].to(tl.int64) * S + n[None, :], acc, mask=mr[:, None] & mn[None, :])


# Triton's CPU interpreter mis-computes tl.dot on bf16 operands: upcast there (as paged_attention_triton).
INTERPRETED = type(_cell_out_kernel).__name__ == "InterpretedFunction"


def state_cell_steps(s0: torch.Tensor, pre_norm: torch.Tensor, fc1: torch.Tensor, fc1_bias: torch.Tensor | None,
                     fc2: torch.Tensor, fc2_bias: torch.Tensor | None, alpha: torch.Tensor, post_norm: torch.Tensor,
                     eps: float) -> Iterator[torch.Tensor]:
    cells = (pre_norm, fc1, fc1_bias, fc2, fc2_bias, alpha, post_norm)
    return (s for s, _ in _cell_chain(s0.float().contiguous(), None, cells, eps, None))


def decode_state_chain(x: torch.Tensor, x_rows: torch.Tensor | None, x_bias: torch.Tensor | None,
                       positions: torch.Tensor, theta: torch.Tensor, state_pool: torch.Tensor, slot_ids: torch.Tensor,
                       cells: tuple, eps: float, fold: torch.Tensor | None = None
                       ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    assert state_pool.is_contiguous() and state_pool.dtype == torch.float32
    if x.stride(-1) != 1:
        x = x.contiguous()
    T = positions.shape[0]
    fold = fold if T <= FOLD_IN_CELL_ROWS else None
    if T == 1:
        return _cell_chain(None, (x, x_rows, x_bias, positions, theta, state_pool, slot_ids), cells, eps, fold)
    # several rows: the readout on its own (inside the cells' row tiles its fp64 angles spill: at 8 rows on an
    # H100 the first cell kernel took 84 µs instead of 10, bench/results/step_timeline_chain_b8-h100.json)
    return _cell_chain(_readout(x, x_rows, x_bias, positions, theta, state_pool, slot_ids), None, cells, eps, fold)


def _cell_chain(s0: torch.Tensor | None, readout: tuple | None, cells: tuple, eps: float,
                fold: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The cells' kernels: from s0 [T, S] fp32, or (readout) from the integral step inside the first two
    steps' kernels; each layer's folded GEMV (fold [L, R, S]) in the kernel that finishes its state."""
    pre_norm, fc1, fc1_bias, fc2, fc2_bias, alpha, post_norm = cells
    L, I, S = fc1.shape
    dev = fc1.device
    if readout is not None:
        x, x_rows, x_bias, positions, theta, pool, slots = readout
        T = positions.shape[0]
    else:
        T = s0.shape[0]
    out = torch.empty(L, T, S, dtype=fc1.dtype, device=dev)
    R = 0 if fold is None else fold.shape[1]
    fold_out = None if fold is None else torch.empty(L, T, R, dtype=fc1.dtype, device=dev)
    if T == 0:
        for i in range(L):
            yield out[i], None if fold_out is None else fold_out[i]
        return
    chain = torch.empty(2, T, S, dtype=torch.float32, device=dev)    # s^l, alternating (read l-1, write l)
    u = torch.empty(T, S, dtype=torch.float32, device=dev)
    h1 = torch.empty(T, I, dtype=fc1.dtype, device=dev)
    if readout is not None:
        s0, integ = torch.empty(2, T, S, dtype=torch.float32, device=dev)   # written by step 0, read by step 1
    else:
        x = positions = theta = pool = slots = integ = u     # unread placeholders
        x_rows = x_bias = None
    f32 = INTERPRETED or fc1.dtype == torch.float32
    common = dict(F32_DOT=INTERPRETED, PREC="ieee" if f32 else "tf32", num_warps=4)
    BM, BN1, BN2, BK2 = CELL_GEMV_TILES if T == 1 else CELL_TILES
    BK2 = min(BK2, max(16, triton.next_power_of_2(I)))
    grid_m = triton.cdiv(T, BM)
    for i in range(L + 1):        # step i finishes cell i (1-based) and starts cell i + 1
        has_mlp, has_fold = i < L, fold is not None and i > 0
        n_mlp = triton.cdiv(I, BN1) if has_mlp else 1
        _cell_in_kernel[(grid_m, n_mlp + (triton.cdiv(R, BN1) if has_fold else 0))](
            s0 if i <= 1 else chain[(i - 1) % 2], u, post_norm[max(i - 1, 0)], pre_norm[min(i, L - 1)], fc1[min(i, L - 1)],
            fc1_bias[min(i, L - 1)] if fc1_bias is not None else u, chain[i % 2], out[max(i - 1, 0)], h1,
            fold[i - 1] if has_fold else u, fold_out[i - 1] if has_fold else u,
            x, x if x_rows is None else x_rows, u if x_bias is None else x_bias, positions, theta, pool, slots, integ,
            x.stride(0), T, eps,
            S=S, I=I, R=R, BS=triton.next_power_of_2(S), BM=BM, BN=BN1, BF=BN1, NM=n_mlp, HAS_PREV=i > 0,
            HAS_MLP=has_mlp, HAS_B1=fc1_bias is not None, HAS_FOLD=has_fold,
            READOUT=0 if readout is None or i > 1 else i + 1, GATHER=x_rows is not None, HAS_XB=x_bias is not None,
            **common, **pdl.launch_kwargs(dev))
        if i > 0:
            yield out[i - 1], fold_out[i - 1] if has_fold else None
        if has_mlp:
            _cell_out_kernel[(grid_m, triton.cdiv(S, BN2))](
                h1, fc2[i], fc2_bias[i] if fc2_bias is not None else u, alpha[i], u, T,
                S=S, I=I, HS=S // alpha.shape[1], BM=BM, BN=BN2, BK=BK2,
                HAS_B2=fc2_bias is not None, **common, **pdl.launch_kwargs(dev))


@triton.jit
def _state_inputs_kernel(r_ptr, rb_ptr, w_ptr, x_ptr, sr, eps, N: tl.constexpr, BN: tl.constexpr,
                         HAS_RB: tl.constexpr, PDL: tl.constexpr):
    if PDL:   # kernels/pdl.py: nothing is read or written before the wait
        pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BN)
    m = offs < N
    v = tl.load(r_ptr + row * sr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_RB:  # r + bias is stored in the model dtype before the norm, as the reference
        v = (v + tl.load(rb_ptr + offs, mask=m, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
    y = v * tl.rsqrt(tl.sum(v * v, axis=0) / N + eps) * tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(x_ptr + row * N + offs, y.to(x_ptr.dtype.element_ty), mask=m)


def state_inputs(r: torch.Tensor, r_bias: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    T, N = r.shape
    r = r if r.stride(-1) == 1 else r.contiguous()
    x = torch.empty(T, N, dtype=r.dtype, device=r.device)
    if T:
        _state_inputs_kernel[(T,)](r, r_bias if r_bias is not None else r, weight, x, r.stride(0), eps, N=N,
                                   BN=triton.next_power_of_2(N), HAS_RB=r_bias is not None,
                                   num_warps=4 if N >= 1024 else 1, **pdl.launch_kwargs(r.device))
    return x


@triton.jit
def _folded_entry_kernel(u_ptr, s_ptr, vec_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, su, ss, sc, eps,
                         S: tl.constexpr, BS: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr,
                         HALF: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr):
    """Row t, kv heads [BH·pid(1), +BH): the norm's quadratic form over the S state dims (each program
    recomputes it: S is small), then k = RoPE(u_k + c_k)·rstd and v = (u_v + c_v)·rstd."""
    if PDL:   # kernels/pdl.py: nothing is read or written before the wait
        pdl.enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    KV: tl.constexpr = 2 * HKV * D
    j = tl.arange(0, BS)
    mj = j < S
    sv = tl.load(s_ptr + t * ss + j, mask=mj, other=0.0).to(tl.float32)
    z = tl.load(u_ptr + t * su + KV + j, mask=mj, other=0.0).to(tl.float32)
    g = tl.load(vec_ptr + KV + j, mask=mj, other=0.0)
    ms = tl.sum(sv * (z + 2.0 * g), axis=0) + tl.load(vec_ptr + KV + S)
    rstd = tl.rsqrt(tl.maximum(ms, 0.0) + eps)           # ms = mean(y²) ≥ 0 up to rounding
    h = tl.program_id(1) * BH + tl.arange(0, BH)[:, None]
    d = tl.arange(0, BD)[None, :]
    m = (h < HKV) & (d < D)
    col = h * D + d
    is_rot = d < ROT
    pcol = h * D + tl.where(d < HALF, d + HALF, d - HALF)
    mp = m & is_rot
    k = tl.load(u_ptr + t * su + col, mask=m, other=0.0).to(tl.float32) + tl.load(vec_ptr + col, mask=m, other=0.0)
    kp = tl.load(u_ptr + t * su + pcol, mask=mp, other=0.0).to(tl.float32) + tl.load(vec_ptr + pcol, mask=mp,
                                                                                      other=0.0)
    c = tl.load(cos_ptr + t * sc + d, mask=is_rot, other=1.0).to(tl.float32)
    sn = tl.load(sin_ptr + t * sc + d, mask=is_rot, other=0.0).to(tl.float32)
    k = _rotate_half(k, kp, c, sn, d, is_rot, HALF) * rstd
    v = (tl.load(u_ptr + t * su + HKV * D + col, mask=m, other=0.0).to(tl.float32)
         + tl.load(vec_ptr + HKV * D + col, mask=m, other=0.0)) * rstd
    out = (t * HKV + h) * D + d
    tl.store(k_ptr + out, k.to(k_ptr.dtype.element_ty), mask=m)
    tl.store(v_ptr + out, v.to(v_ptr.dtype.element_ty), mask=m)


def folded_entry(u: torch.Tensor, s: torch.Tensor, vec: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 num_kv_heads: int, head_dim: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    T, S = s.shape
    assert u.shape == (T, 2 * num_kv_heads * head_dim + S) and vec.dtype == torch.float32 and vec.is_contiguous()
    u = u if u.stride(-1) == 1 else u.contiguous()
    s = s if s.stride(-1) == 1 else s.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    k = torch.empty(T, num_kv_heads, head_dim, dtype=s.dtype, device=s.device)
    v = torch.empty_like(k)
    rot = cos.shape[-1]
    BH = min(triton.next_power_of_2(num_kv_heads), 16)
    if T:
        _folded_entry_kernel[(T, triton.cdiv(num_kv_heads, BH))](
            u, s, vec, cos, sin, k, v, u.stride(0), s.stride(0), cos.stride(0), eps, S=S,
            BS=triton.next_power_of_2(S), HKV=num_kv_heads, D=head_dim, ROT=rot, HALF=rot // 2, BH=BH,
            BD=triton.next_power_of_2(head_dim), num_warps=1 if BH * head_dim <= 1024 else 4,
            **pdl.launch_kwargs(s.device))
    return k, v
