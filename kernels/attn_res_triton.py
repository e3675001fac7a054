"""Block AttnRes routing in one kernel per routing point: each program takes one token row, reads every
source once (no stacking copy), and does the fp32 RMS, logits, softmax over depth and mixture in registers."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridserve.kernels.attn_res import MAX_SOURCES


@triton.jit
def _source(s0, s1, s2, s3, s4, s5, s6, s7, i: tl.constexpr):
    if i == 0:
        return s0
    elif i == 1:
        return s1
    elif i == 2:
        return s2
    elif i == 3:
        return s3
    elif i == 4:
        return s4
    elif i == 5:
        return s5
    elif i == 6:
        return s6
    else:
        return s7


@triton.jit
def _route_kernel(s0, s1, s2, s3, s4, s5, s6, s7, q_ptr, w_ptr, y_ptr, stride, eps,
                  S: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BD)
    m = offs < D
    qw = tl.load(q_ptr + offs, mask=m, other=0.0).to(tl.float32) * tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    best = -float("inf")
    denom = 0.0
    acc = tl.zeros([BD], dtype=tl.float32)
    for i in tl.static_range(S):
        x = tl.load(_source(s0, s1, s2, s3, s4, s5, s6, s7, i) + row * stride + offs, mask=m, other=0.0).to(tl.float32)
        logit = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps) * tl.sum(x * qw, axis=0)
        new = tl.maximum(best, logit)
        scale = tl.exp(best - new)
        p = tl.exp(logit - new)
        acc = acc * scale + p * x
        denom = denom * scale + p
        best = new
    tl.store(y_ptr + row * D + offs, (acc / denom).to(y_ptr.dtype.element_ty), mask=m)


def route(sources: list[torch.Tensor], query: torch.Tensor, norm_w: torch.Tensor, eps: float) -> torch.Tensor:
    if len(sources) == 1:
        return sources[0]
    assert len(sources) <= MAX_SOURCES, f"at most {MAX_SOURCES} sources"
    src = [s if s.is_contiguous() else s.contiguous() for s in sources]
    T, D = src[0].shape
    ptrs = src + [src[0]] * (MAX_SOURCES - len(src))
    y = torch.empty_like(src[0])
    if T:
        _route_kernel[(T,)](*ptrs, query, norm_w, y, D, eps, S=len(src), D=D, BD=triton.next_power_of_2(D),
                            num_warps=4 if D >= 1024 else 2)
    return y
