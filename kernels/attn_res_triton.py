"""Block AttnRes routing in one kernel per routing point: each program takes one token row, reads every
source once (no stacking copy), and does the fp32 RMS, logits, softmax over depth and mixture in registers.
`route_add` takes the sublayer's residual add into the partial (the last source) with it, so a sublayer
boundary of Kotodama is one kernel instead of an add and a route."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from hybridserve.kernels import pdl
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
def _route_kernel(s0, s1, s2, s3, s4, s5, s6, s7, d_ptr, p_ptr, q_ptr, w_ptr, y_ptr, stride, eps,
                  S: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, ADD: tl.constexpr, PDL: tl.constexpr):
    if PDL:   # kernels/pdl.py: nothing is read or written before the wait
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0)
    offs = tl.arange(0, BD)
    m = offs < D
    qw = tl.load(q_ptr + offs, mask=m, other=0.0).to(tl.float32) * tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    best = -float("inf")
    denom = 0.0
    acc = tl.zeros([BD], dtype=tl.float32)
    for i in tl.static_range(S):
        x = tl.load(_source(s0, s1, s2, s3, s4, s5, s6, s7, i) + row * stride + offs, mask=m, other=0.0).to(tl.float32)
        if ADD and i == S - 1:  # the new partial, routed as stored (rounded to its dtype)
            xs = (x + tl.load(d_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32)).to(p_ptr.dtype.element_ty)
            tl.store(p_ptr + row * D + offs, xs, mask=m)
            x = xs.to(tl.float32)
        logit = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps) * tl.sum(x * qw, axis=0)
        new = tl.maximum(best, logit)
        scale = tl.exp(best - new)
        p = tl.exp(logit - new)
        acc = acc * scale + p * x
        denom = denom * scale + p
        best = new
    tl.store(y_ptr + row * D + offs, (acc / denom).to(y_ptr.dtype.element_ty), mask=m)


def _launch(sources, delta, partial, query, norm_w, eps):
    assert len(sources) <= MAX_SOURCES, f"at most {MAX_SOURCES} sources"
    src = [s if s.is_contiguous() else s.contiguous() for s in sources]
    T, D = src[0].shape
    ptrs = src + [src[0]] * (MAX_SOURCES - len(src))
    y = torch.empty_like(src[0])
    if T:
        _route_kernel[(T,)](*ptrs, delta if delta is not None else y, partial if partial is not None else y,
                            query, norm_w, y, D, eps, S=len(src), D=D, BD=triton.next_power_of_2(D),
                            ADD=delta is not None, num_warps=4 if D >= 1024 else 2, **pdl.launch_kwargs(y.device))
    return y


def route(sources: list[torch.Tensor], query: torch.Tensor, norm_w: torch.Tensor, eps: float) -> torch.Tensor:
    if len(sources) == 1:
        return sources[0]
    return _launch(sources, None, None, query, norm_w, eps)


def route_add(sources: list[torch.Tensor], delta: torch.Tensor, query: torch.Tensor, norm_w: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if len(sources) == 1:
        partial = sources[0] + delta
        return partial, partial
    delta = delta if delta.is_contiguous() else delta.contiguous()
    partial = torch.empty(delta.shape, dtype=torch.result_type(sources[-1], delta), device=delta.device)
    return partial, _launch(sources, delta, partial, query, norm_w, eps)
