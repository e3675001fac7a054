"""One-kernel versions of the per-layer glue in kernels/fused.py (same functions, same results up to
rounding). A decode step is launch-bound for small models: RMSNorm alone is ~8 kernels in eager PyTorch."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, B, sx_a, sx_b, eps, N: tl.constexpr, BN: tl.constexpr,
                     HAS_W: tl.constexpr):
    row = tl.program_id(0)
    a, b = row // B, row % B
    offs = tl.arange(0, BN)
    m = offs < N
    x = tl.load(x_ptr + a * sx_a + b * sx_b + offs, mask=m, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    if HAS_W:
        y = y * tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    N = x.shape[-1]
    if x.stride(-1) != 1 or x.dim() > 3:
        x = x.contiguous()
    x3 = x.view(-1, 1, N) if x.dim() < 3 and x.is_contiguous() else (x if x.dim() == 3 else x[:, None, :])
    A, B = x3.shape[0], x3.shape[1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel():
        _rms_norm_kernel[(A * B,)](x3, weight if weight is not None else x3, y, B, x3.stride(0), x3.stride(1),
                                   eps, N=N, BN=triton.next_power_of_2(N), HAS_W=weight is not None,
                                   num_warps=4 if N >= 1024 else 1)
    return y


@triton.jit
def _silu_mul_kernel(gu_ptr, y_ptr, I, s_row, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < I
    g = tl.load(gu_ptr + row * s_row + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * s_row + I + offs, mask=m, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(y_ptr + row * I + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gu = gate_up.reshape(-1, gate_up.shape[-1])
    if gu.stride(-1) != 1:
        gu = gu.contiguous()
    I = gu.shape[1] // 2
    y = torch.empty(gu.shape[0], I, dtype=gu.dtype, device=gu.device)
    BLOCK = min(1024, triton.next_power_of_2(I))
    if y.numel():
        _silu_mul_kernel[(gu.shape[0], triton.cdiv(I, BLOCK))](gu, y, I, gu.stride(0), BLOCK=BLOCK, num_warps=4)
    return y.view(*gate_up.shape[:-1], I)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, sx_t, sx_h, sc_t, D: tl.constexpr, ROT: tl.constexpr,
                 HALF: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1) * BH + tl.arange(0, BH)[:, None]
    d = tl.arange(0, BD)[None, :]
    m = (h < H) & (d < D)
    x = tl.load(x_ptr + t * sx_t + h * sx_h + d, mask=m, other=0.0).to(tl.float32)
    is_rot = d < ROT
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    xp = tl.load(x_ptr + t * sx_t + h * sx_h + partner, mask=m & is_rot, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + t * sc_t + d, mask=is_rot, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + t * sc_t + d, mask=is_rot, other=0.0).to(tl.float32)
    rotated = tl.where(d < HALF, -xp, xp)
    y = tl.where(is_rot, x * c + rotated * s, x)
    tl.store(y_ptr + (t * H + h) * D + d, y.to(y_ptr.dtype.element_ty), mask=m)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    T, H, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    rot = cos.shape[-1]
    y = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    BH = min(triton.next_power_of_2(H), 16)
    if y.numel():
        _rope_kernel[(T, triton.cdiv(H, BH))](x, cos, sin, y, H, x.stride(0), x.stride(1), cos.stride(0), D=D,
                                             ROT=rot, HALF=rot // 2, BH=BH, BD=triton.next_power_of_2(D),
                                             num_warps=1 if H * D <= 1024 else 4)
    return y
