"""Block AttnRes routing in one kernel per routing point: each program takes one token row, reads every
source once (no stacking copy; all sources' loads issued together), and does the fp32 RMS, logits,
softmax over depth and mixture in registers.
`route_add` takes the sublayer's residual add into the partial (the last source) with it, so a sublayer
boundary of Kotodama is one kernel instead of an add and a route."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridserve.kernels import pdl
from hybridserve.kernels.attn_res import MAX_SOURCES


# Source offsets are distances between allocations, anywhere in ±2^46 elements: passed with this bias added, so
# Triton always types them int64 (it types an int argument by its value, i32 or i64, and compiles a variant
# per combination, which turned up as compiles in the middle of serving) and never specialises on their value.
# They are passed in units of UNIT elements (16 bytes where every offset allows it), so the kernel still knows
# each source row is 16-byte aligned and loads it in vectors, as the specialisation used to tell it.
OFFSET_BIAS = 1 << 48
_BIAS = tl.constexpr(OFFSET_BIAS)
_OFFSETS = ("o1", "o2", "o3", "o4", "o5", "o6", "o7")


# The sources other than the last (the blocks committed earlier in the step) read before the PDL wait: on the
# decode path each was written several kernels back (a route kernel of a boundary layer, or the embedding
# gather), and the kernel before this one releases it only after its own wait, by which time every kernel before
# that one has finished (kernels/pdl.py). Their logits and their softmax-weighted mixture are ready before the
# wait; after it only the last source (the running partial, or the sublayer output that starts a block) and the
# delta are read, and the two parts are combined. For routes of at most this many token rows (one row follows the
# streamed GEMV, launched with PDL, so the route's program can be resident during that GEMV's tail; more rows
# follow the tensor-core GEMM, launched without it, where the two reads in turn only lengthen the chain). Off:
# even at one row. H100, Kotodama-3B decode graphs, context 128, three rounds in turn, early vs all after the
# wait: batch 1 2.543 vs 2.549 ms on one machine (bench/results/decode_latency_route_early-h100.json), 2.549 vs
# 2.548 on another (decode_latency_session32-h100.json; two captures of the same graph there differ by up to
# 3 µs); batch 8, early at every row count, 3.044 vs 3.004. Never where kernels release their successors before
# their waits (pdl.EARLY_RELEASE): there a kernel may start while several before it still run. An A/B knob.
COMMITTED_EARLY_ROWS = 0
WARPS: int | None = None    # the route kernel's warps (None: by tile size); an A/B knob


@triton.jit
def _logits(x, qw, eps, D: tl.constexpr):
    """Each source row's routing logit: RMS⁻¹ · (x · q⊙w), over [BS, BD] rows."""
    return tl.rsqrt(tl.sum(x * x, axis=1) / D + eps) * tl.sum(x * qw[None, :], axis=1)


@triton.jit(do_not_specialize=_OFFSETS)
def _route_kernel(s0_ptr, o1, o2, o3, o4, o5, o6, o7, d_ptr, p_ptr, q_ptr, w_ptr, y_ptr, stride, eps,
                  S: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, ADD: tl.constexpr,
                  UNIT: tl.constexpr, EARLY: tl.constexpr, PDL: tl.constexpr):
    """Source i lives at s0_ptr + o_i (element offsets from the first source): all S rows load as one
    [BS, BD] tile, so their loads are in flight together instead of one after another. EARLY: the first S - 1
    sources before the PDL wait (COMMITTED_EARLY_ROWS), the last one after it."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BD)
    m = offs < D
    si = tl.arange(0, BS)
    qw = tl.load(q_ptr + offs, mask=m, other=0.0).to(tl.float32)
    qw *= tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    zero = si.to(tl.int64) * 0
    first = zero + _BIAS   # the first source (and padding): a biased offset of 0; the bias comes off once below
    src = tl.where(si == 1, zero + o1, tl.where(si == 2, zero + o2, tl.where(si == 3, zero + o3, first)))
    src = tl.where(si == 4, zero + o4, tl.where(si == 5, zero + o5, tl.where(si == 6, zero + o6, src)))
    src = (tl.where(si == 7, zero + o7, src) - _BIAS) * UNIT
    if EARLY:
        mc = si < S - 1
        xc = tl.load(s0_ptr + src[:, None] + row * stride + offs[None, :], mask=mc[:, None] & m[None, :],
                     other=0.0).to(tl.float32)
        lc = tl.where(mc, _logits(xc, qw, eps, D), float("-inf"))
        mx = tl.max(lc, axis=0)
        pc = tl.exp(lc - mx)
        zc = tl.sum(pc, axis=0)
        mix = tl.sum(xc * pc[:, None], axis=0)      # the committed part, weighted relative to its own max
        if PDL:
            pdl.enter(PDL)
        last = tl.sum(tl.where(si == S - 1, src, 0), axis=0)
        x = tl.load(s0_ptr + last + row * stride + offs, mask=m, other=0.0).to(tl.float32)
        if ADD:   # the new partial, routed as stored (rounded to its dtype)
            x = (x + tl.load(d_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32)).to(p_ptr.dtype.element_ty)
            tl.store(p_ptr + row * D + offs, x, mask=m)
            x = x.to(tl.float32)
        ll = tl.sum(_logits(x[None, :], qw, eps, D), axis=0)
        top = tl.maximum(mx, ll)
        a = tl.exp(mx - top)
        b = tl.exp(ll - top)
        y = (a * mix + b * x) / (a * zc + b)
    else:
        if PDL:   # kernels/pdl.py: only the weights are read before the wait
            pdl.enter(PDL)
        ms = si < S
        x = tl.load(s0_ptr + src[:, None] + row * stride + offs[None, :], mask=ms[:, None] & m[None, :],
                    other=0.0).to(tl.float32)
        if ADD:   # the new partial (the last source), routed as stored (rounded to its dtype)
            dl = tl.load(d_ptr + row * D + offs, mask=m, other=0.0).to(tl.float32)
            last = si[:, None] == S - 1
            x = tl.where(last, (x + dl[None, :]).to(p_ptr.dtype.element_ty).to(tl.float32), x)
            tl.store(p_ptr + row * D + si[:, None] * 0 + offs[None, :], x.to(p_ptr.dtype.element_ty),
                     mask=last & m[None, :])
        logit = tl.where(ms, _logits(x, qw, eps, D), float("-inf"))
        p = tl.exp(logit - tl.max(logit, axis=0))
        p = p / tl.sum(p, axis=0)
        y = tl.sum(x * p[:, None], axis=0)
    tl.store(y_ptr + row * D + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def _launch(sources, delta, partial, query, norm_w, eps):
    assert len(sources) <= MAX_SOURCES, f"at most {MAX_SOURCES} sources"
    src = [s if s.is_contiguous() else s.contiguous() for s in sources]
    T, D = src[0].shape
    assert all(s.dtype == src[0].dtype and s.shape == src[0].shape for s in src)
    size = src[0].element_size()
    offsets = [(s.data_ptr() - src[0].data_ptr()) // size for s in src[1:]]
    unit = 16 // size if all(o % (16 // size) == 0 for o in offsets) and 16 % size == 0 else 1
    offsets = [o // unit + OFFSET_BIAS for o in offsets]
    offsets += [OFFSET_BIAS] * (MAX_SOURCES - 1 - len(offsets))
    y = torch.empty_like(src[0])
    BD = triton.next_power_of_2(D)
    BS = triton.next_power_of_2(len(src))
    if T:
        _route_kernel[(T,)](src[0], *offsets, delta if delta is not None else y,
                            partial if partial is not None else y, query, norm_w, y, D, eps, S=len(src), BS=BS,
                            D=D, BD=BD, ADD=delta is not None, UNIT=unit,
                            EARLY=T <= COMMITTED_EARLY_ROWS and not pdl.EARLY_RELEASE,
                            num_warps=WARPS or (16 if BS * BD >= 16384 else 8 if BS * BD >= 4096 else 4),
                            **pdl.launch_kwargs(y.device))
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

