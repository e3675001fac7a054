"""NeoLLM's per-layer glue as few kernels, same functions and results (up to rounding) as
kernels/neollm_ops.py.

A decode step of a few rows is a chain of matmul-vector products, so the glue goes inside them: one GEMV
kernel takes the GPAS residual add (h + delta)·scale and the RMSNorm of its input (the sum of squares
accumulates beside the product and the norm applies at the end; program 0 stores the new residual rows),
or PolyNorm(g)·u of the MLP's gate/up row (its three norms from the row's tile when the row is one tile,
else from a pass over the row first; rounded as the unfused path stores it: on H100 this beats applying
each term's norm after its own product, 2.4 vs 3.2 µs for NeoLLM's down projection), and puts the bias
and FAN's cos/sin on its outputs. A layer is then its mixer kernels and 5 GEMVs (FAN, mixer in, mixer
out, gate_up, down) with no other glue kernel. The GEMV is built like kernels/fused_triton.py's and
shares its measured tiling and row limit (each weight read once for all rows; programmatic dependent
launch); more rows go to cuBLAS with the glue in one row kernel before or after it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hybridserve.kernels import fused_triton, pdl
from hybridserve.kernels.neollm_ops import POLYNORM_EPS

POLY_EPS = tl.constexpr(POLYNORM_EPS)     # a global a kernel may read


@triton.jit
def _poly(g, g2, pw_ptr, pb, r1, r2, r3):
    """w0·N(g³) + w1·N(g²) + w2·N(g) + b in fp32, given the three rsqrt factors r_i of g^i."""
    w0 = tl.load(pw_ptr).to(tl.float32)
    w1 = tl.load(pw_ptr + 1).to(tl.float32)
    w2 = tl.load(pw_ptr + 2).to(tl.float32)
    return w0 * (g2 * g * r3) + w1 * (g2 * r2) + w2 * (g * r1) + pb


@triton.jit
def _pick(v, rm, r):
    """Element r of a per-row vector v [BM], as a scalar."""
    return tl.sum(tl.where(rm == r, v, 0.0), axis=0)


@triton.jit
def _gemv_kernel(x_ptr, d_ptr, h_ptr, nw_ptr, pw_ptr, pb_ptr, w_ptr, b_ptr, y_ptr, M, N, K, sx, sd, sy, scale, eps,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ADD: tl.constexpr, NORM: tl.constexpr,
                 POLY: tl.constexpr, ONE_TILE: tl.constexpr, BIAS: tl.constexpr, FAN_P: tl.constexpr,
                 PDL: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BN + tl.arange(0, BN)
    mn = n < N
    rows = n[:, None].to(tl.int64) * K
    rk = tl.arange(0, BK)
    rm = tl.arange(0, BM)
    # weights are constant during the step: the first tile is read before the producer of x finishes
    w = tl.load(w_ptr + rows + rk[None, :], mask=mn[:, None] & (rk < K)[None, :], other=0.0)
    if PDL:
        pdl.enter(PDL)
    r1 = tl.zeros((BM,), dtype=tl.float32)
    r2 = r1
    r3 = r1
    pb = 0.0
    if POLY:
        pb = tl.load(pb_ptr).to(tl.float32)
    if POLY and not ONE_TILE:   # PolyNorm's three rsqrt factors (of g, g², g³ over the whole row) first
        s2 = tl.zeros((BM, BK), dtype=tl.float32)
        s4 = tl.zeros((BM, BK), dtype=tl.float32)
        s6 = tl.zeros((BM, BK), dtype=tl.float32)
        for k0 in range(0, K, BK):
            m = (rm < M)[:, None] & ((k0 + rk) < K)[None, :]
            g = tl.load(x_ptr + rm[:, None] * sx + k0 + rk[None, :], mask=m, other=0.0).to(tl.float32)
            g2 = g * g
            s2 += g2
            s4 += g2 * g2
            s6 += g2 * g2 * g2
        r1 = tl.rsqrt(tl.sum(s2, axis=1) / K + POLY_EPS)
        r2 = tl.rsqrt(tl.sum(s4, axis=1) / K + POLY_EPS)
        r3 = tl.rsqrt(tl.sum(s6, axis=1) / K + POLY_EPS)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    ss = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        mk = kk < K
        if k0 > 0:
            w = tl.load(w_ptr + rows + kk[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        wf = w.to(tl.float32)
        if NORM:
            nw = tl.load(nw_ptr + kk, mask=mk, other=0.0).to(tl.float32)
        for r in tl.static_range(BM):
            mx = mk & ((kk * 0 + r) < M)
            x = tl.load(x_ptr + r * sx + kk, mask=mx, other=0.0).to(tl.float32)
            if ADD:     # the residual stream as stored: the sum rounded, then the GPAS scale rounded
                dt = h_ptr.dtype.element_ty
                hx = (x + tl.load(d_ptr + r * sd + kk, mask=mx, other=0.0).to(tl.float32)).to(dt)
                hx = (hx.to(tl.float32) * scale).to(dt)
                if pid == 0:
                    tl.store(h_ptr + r * K + kk, hx, mask=mx)
                x = hx.to(tl.float32)
            if POLY:    # x is g, u sits K columns on; PolyNorm rounded as stored, then ·u rounded
                dt = x_ptr.dtype.element_ty
                u = tl.load(x_ptr + r * sx + K + kk, mask=mx, other=0.0).to(tl.float32)
                g2 = x * x
                if ONE_TILE:    # the whole row is this tile: the factors from it, no pass before
                    f1 = tl.rsqrt(tl.sum(g2, axis=0) / K + POLY_EPS)
                    f2 = tl.rsqrt(tl.sum(g2 * g2, axis=0) / K + POLY_EPS)
                    f3 = tl.rsqrt(tl.sum(g2 * g2 * g2, axis=0) / K + POLY_EPS)
                else:
                    f1, f2, f3 = _pick(r1, rm, r), _pick(r2, rm, r), _pick(r3, rm, r)
                p = _poly(x, g2, pw_ptr, pb, f1, f2, f3)
                x = (p.to(dt).to(tl.float32) * u).to(dt).to(tl.float32)
            if NORM:
                ss = tl.where(rm == r, ss + tl.sum(x * x, axis=0), ss)
                x = x * nw
            acc = tl.where(rm[:, None] == r, acc + tl.sum(wf * x[None, :], axis=1)[None, :], acc)
    y = acc
    if NORM:
        y = y * tl.rsqrt(ss / K + eps)[:, None]
    if BIAS:
        y += tl.load(b_ptr + n, mask=mn, other=0.0).to(tl.float32)[None, :]
    y = y.to(w_ptr.dtype.element_ty).to(tl.float32)          # the matmul's stored output, as the reference
    mo = (rm < M)[:, None] & mn[None, :]
    out = y_ptr + rm[:, None] * sy + n[None, :]
    if FAN_P > 0:           # [P | G] → [cos P | sin P | G]: output n < P also writes column n + P
        per = (n < FAN_P)[None, :]
        tl.store(out, tl.cos(y).to(y_ptr.dtype.element_ty), mask=mo & per)
        tl.store(out + FAN_P, tl.where(per, tl.sin(y), y).to(y_ptr.dtype.element_ty), mask=mo)
    else:
        tl.store(out, y.to(y_ptr.dtype.element_ty), mask=mo)


def _gemv(x, delta, scale, norm_weight, poly, weight, bias, eps, fan_p, out_dtype):
    """A few rows; x is the input (or [g | u] with poly = (weight, bias)). Returns (h, y)."""
    M = x.shape[0]
    N, K = weight.shape
    assert weight.is_contiguous() and fused_triton.gemv_rows(M, K)
    x = x if x.stride(-1) == 1 else x.contiguous()
    h = x
    if delta is not None:
        delta = delta if delta.stride(-1) == 1 else delta.contiguous()
        h = torch.empty(x.shape, dtype=torch.result_type(x, delta), device=x.device)
    y = torch.empty(M, N + fan_p, dtype=out_dtype or x.dtype, device=x.device)
    if M == 0:
        return h, y
    pw, pb = poly if poly is not None else (x, x)
    BN, BK, warps = fused_triton.gemv_config(M, N, K)
    _gemv_kernel[(triton.cdiv(N, BN),)](
        x, delta if delta is not None else x, h, norm_weight if norm_weight is not None else x, pw, pb, weight,
        bias if bias is not None else x, y, M, N, K, x.stride(0), delta.stride(0) if delta is not None else 0,
        y.stride(0), scale, eps, BM=triton.next_power_of_2(M), BN=BN, BK=BK, ADD=delta is not None,
        NORM=norm_weight is not None, POLY=poly is not None, ONE_TILE=K <= BK, BIAS=bias is not None, FAN_P=fan_p,
        num_warps=warps, num_stages=fused_triton.GEMV_STAGES, **pdl.launch_kwargs(x.device))
    return h, y


# -- more rows: cuBLAS, with the glue as one row kernel around it ------------------------------------

@triton.jit
def _add_scale_norm_kernel(x_ptr, d_ptr, nw_ptr, h_ptr, y_ptr, sx, sd, scale, eps, N: tl.constexpr,
                           BN: tl.constexpr, ADD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BN)
    m = offs < N
    x = tl.load(x_ptr + row * sx + offs, mask=m, other=0.0).to(tl.float32)
    if ADD:
        dt = h_ptr.dtype.element_ty
        h = (x + tl.load(d_ptr + row * sd + offs, mask=m, other=0.0).to(tl.float32)).to(dt)
        h = (h.to(tl.float32) * scale).to(dt)
        tl.store(h_ptr + row * N + offs, h, mask=m)
        x = h.to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, axis=0) / N + eps) * tl.load(nw_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + offs, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _fan_kernel(x_ptr, y_ptr, sx, N: tl.constexpr, P: tl.constexpr, BN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = tl.arange(0, BN)
    m = n < N
    x = tl.load(x_ptr + row * sx + n, mask=m, other=0.0).to(tl.float32)
    out = y_ptr + row * (N + P) + n
    per = n < P
    tl.store(out, tl.cos(x).to(y_ptr.dtype.element_ty), mask=m & per)
    tl.store(out + P, tl.where(per, tl.sin(x), x).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _poly_mul_kernel(gu_ptr, pw_ptr, pb_ptr, y_ptr, sx, N: tl.constexpr, BN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BN)
    m = offs < N
    g = tl.load(gu_ptr + row * sx + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * sx + N + offs, mask=m, other=0.0).to(tl.float32)
    g2 = g * g
    r1 = tl.rsqrt(tl.sum(g2, axis=0) / N + POLY_EPS)
    r2 = tl.rsqrt(tl.sum(g2 * g2, axis=0) / N + POLY_EPS)
    r3 = tl.rsqrt(tl.sum(g2 * g2 * g2, axis=0) / N + POLY_EPS)
    p = _poly(g, g2, pw_ptr, tl.load(pb_ptr).to(tl.float32), r1, r2, r3)
    dt = y_ptr.dtype.element_ty
    tl.store(y_ptr + row * N + offs, (p.to(dt).to(tl.float32) * u).to(dt), mask=m)


def _row_warps(n: int) -> int:
    return 4 if n >= 1024 else 1


# -- the functions of kernels/neollm_ops.py ---------------------------------------------------------

PADDED_HEAD = True   # multi-row products against the row-padded weight when one is given (A/B knob)


def add_scale_norm_linear(h: torch.Tensor, delta: torch.Tensor | None, scale: float, norm_weight: torch.Tensor,
                          weight: torch.Tensor, eps: float, bias: torch.Tensor | None = None, fan_p: int = 0,
                          out_dtype: torch.dtype | None = None,
                          padded_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if fused_triton.gemv_rows(*h.shape):
        return _gemv(h, delta, scale, norm_weight, None, weight, bias, eps, fan_p, out_dtype)
    M, N = h.shape
    h = h if h.stride(-1) == 1 else h.contiguous()
    out = h
    if delta is not None:
        delta = delta if delta.stride(-1) == 1 else delta.contiguous()
        out = torch.empty(h.shape, dtype=torch.result_type(h, delta), device=h.device)
    x = torch.empty_like(out)
    _add_scale_norm_kernel[(M,)](h, delta if delta is not None else h, norm_weight, out, x, h.stride(0),
                                 delta.stride(0) if delta is not None else 0, scale, eps, N=N,
                                 BN=triton.next_power_of_2(N), ADD=delta is not None, num_warps=_row_warps(N))
    if PADDED_HEAD and padded_weight is not None and bias is None and not fan_p:   # an aligned row, then N columns
        y = F.linear(x, padded_weight)[:, :weight.shape[0]]
        return out, (y if out_dtype is None else y.to(out_dtype)).contiguous()
    y = F.linear(x, weight, bias)
    if fan_p:
        pg, P = y, y.shape[1]
        y = torch.empty(M, P + fan_p, dtype=pg.dtype, device=pg.device)
        _fan_kernel[(M,)](pg, y, pg.stride(0), N=P, P=fan_p, BN=triton.next_power_of_2(P), num_warps=_row_warps(P))
    return out, y if out_dtype is None else y.to(out_dtype)


def poly_mul_linear(gate_up: torch.Tensor, poly_weight: torch.Tensor, poly_bias: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:
    if fused_triton.gemv_rows(gate_up.shape[0], weight.shape[1]):
        return _gemv(gate_up, None, 1.0, None, (poly_weight, poly_bias), weight, None, 0.0, 0, None)[1]
    gu = gate_up if gate_up.stride(-1) == 1 else gate_up.contiguous()
    M, N = gu.shape[0], gu.shape[1] // 2
    x = torch.empty(M, N, dtype=gu.dtype, device=gu.device)
    _poly_mul_kernel[(M,)](gu, poly_weight, poly_bias, x, gu.stride(0), N=N, BN=triton.next_power_of_2(N),
                           num_warps=_row_warps(N))
    return F.linear(x, weight)
