"""One-kernel versions of the per-layer glue in kernels/fused.py (same functions, same results up to
rounding). A decode step is launch-bound for small models: RMSNorm alone is ~8 kernels in eager PyTorch,
and a layer's glue around its matmuls another ~10; here it goes into the matmuls' neighbours or into them."""
from __future__ import annotations

import os
from functools import lru_cache

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from hybridserve.kernels import l2_prefetch, pdl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, B, sx_a, sx_b, eps, N: tl.constexpr, BN: tl.constexpr,
                     HAS_W: tl.constexpr, PDL: tl.constexpr):
    if PDL:   # kernels/pdl.py: nothing is read or written before the wait
        pdl.enter(PDL)
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
                                   num_warps=4 if N >= 1024 else 1, **pdl.launch_kwargs(y.device))
    return y


@triton.jit
def _silu_mul_kernel(gu_ptr, y_ptr, I, s_row, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:   # kernels/pdl.py: nothing is read or written before the wait
        pdl.enter(PDL)
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
        _silu_mul_kernel[(gu.shape[0], triton.cdiv(I, BLOCK))](gu, y, I, gu.stride(0), BLOCK=BLOCK, num_warps=4,
                                                               **pdl.launch_kwargs(y.device))
    return y.view(*gate_up.shape[:-1], I)


# A step's first reads: its tokens' embedding rows and its positions' cos/sin rows (a [2, L, R] stack, both in
# one launch). Torch's index kernels (one each for the embedding, cos and sin) were not on PDL; here the next
# kernel launches at once and streams its first weight tile while the rows are copied. H100, whole decode
# steps, three rounds in turn (bench/results/decode_latency_step_ends-h100.json, with the argmax on PDL):
# batch 1 Spartacus 1.0811 → 1.0800 ms, NanoHammer 1.1250 → 1.1230, Kotodama-3B 2.6317 → 2.6297; batch 8
# −6 / −7 / −11 µs. Reading the row inside the first layer's GEMV instead (batch 1) measured 0.7 µs slower
# than this kernel on Spartacus (1.0799 vs 1.0792 ms, decode_latency_gather_in_gemv-h100.json): not kept.
GATHER_KERNEL = True     # False: torch's index_select (an A/B knob for bench/decode_latency.py)


@triton.jit(do_not_specialize=["T"])    # one variant for every token count (eager steps vary it)
def _gather_rows_kernel(t_ptr, ids_ptr, y_ptr, L, T, R, BR: tl.constexpr, PDL: tl.constexpr):
    t = tl.program_id(0)
    g = tl.program_id(1)
    if PDL:   # the ids may come from the kernel before (an async-scheduled step's token gather)
        pdl.enter(PDL)
    row = tl.load(ids_ptr + t).to(tl.int64)
    cols = tl.program_id(2) * BR + tl.arange(0, BR)
    m = cols < R
    v = tl.load(t_ptr + (g * L + row) * R + cols, mask=m)
    tl.store(y_ptr + (g * T + t) * R + cols, v, mask=m)


def gather_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    if not GATHER_KERNEL:
        return table.index_select(-2, ids)
    lead = table.shape[:-2]
    L, R = table.shape[-2:]
    G = table.numel() // max(L * R, 1)
    table = table if table.is_contiguous() else table.contiguous()
    y = torch.empty(*lead, ids.shape[0], R, dtype=table.dtype, device=table.device)
    BR = min(triton.next_power_of_2(R), 2048)
    if ids.numel() and G and R:
        _gather_rows_kernel[(ids.shape[0], G, triton.cdiv(R, BR))](
            table, ids, y, L, ids.shape[0], R, BR=BR, num_warps=4, **pdl.launch_kwargs(table.device))
    return y


@triton.jit
def _rotate_half(x, xp, c, s, d, is_rot, HALF: tl.constexpr):
    """Rotate-half RoPE where is_rot: x·cos + (−x[d+half] | x[d−half])·sin, from x and its partner column xp
    (fp32); x elsewhere."""
    return tl.where(is_rot, x * c + tl.where(d < HALF, -xp, xp) * s, x)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, sx_t, sx_h, sc_t, D: tl.constexpr, ROT: tl.constexpr,
                 HALF: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr):
    if PDL:   # kernels/pdl.py: nothing is read or written before the wait
        pdl.enter(PDL)
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
    y = _rotate_half(x, xp, c, s, d, is_rot, HALF)
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
                                             num_warps=1 if H * D <= 1024 else 4, **pdl.launch_kwargs(y.device))
    return y


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, h_ptr, y_ptr, sx, sr, eps, N: tl.constexpr, BN: tl.constexpr,
                         PDL: tl.constexpr):
    if PDL:   # kernels/pdl.py: nothing is read or written before the wait
        pdl.enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BN)
    m = offs < N
    x = tl.load(x_ptr + row * sx + offs, mask=m, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * sr + offs, mask=m, other=0.0).to(tl.float32)
    h = (x + r).to(h_ptr.dtype.element_ty)      # rounded as the stream is stored, then normalised
    tl.store(h_ptr + row * N + offs, h, mask=m)
    hf = h.to(tl.float32)
    y = hf * tl.rsqrt(tl.sum(hf * hf, axis=0) / N + eps) * tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + offs, y.to(y_ptr.dtype.element_ty), mask=m)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    N = x.shape[-1]
    x2, r2 = x.reshape(-1, N), residual.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    h = torch.empty(x.shape, dtype=torch.result_type(x, residual), device=x.device)
    y = torch.empty_like(h)
    if h.numel():
        _add_rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, h, y, x2.stride(0), r2.stride(0), eps, N=N,
                                             BN=triton.next_power_of_2(N), num_warps=4 if N >= 1024 else 1,
                                             **pdl.launch_kwargs(y.device))
    return h, y


# Matmuls of a few rows (decode steps of batch <= GEMV_MAX_ROWS) run as a Triton GEMV that reads each
# weight once for all rows. It takes the glue around the matmul with it: the residual add and RMSNorm of
# its input (the sum of squares accumulates beside the product and the scale applies at the end; program 0
# stores the new residual rows) and SiLU·mul of a stacked [gate; up] weight, so a layer is 4 GEMVs and no
# other glue kernel, and it has no split-K reduction. Being bandwidth-bound, it wants many weight bytes in
# flight: each program loads a [BN, BK] tile at once (BK up to the whole row), shaped per matrix by a
# measured rule (gemv_config). With programmatic dependent launch (kernels/pdl.py)
# a program loads its first weight tile before waiting for the kernel that produces its input. More rows
# (gemv_rows) take the multi-row GEMM or cuBLAS, with the add + norm in one kernel before it.
GEMV_MAX_ROWS = 1      # 2 rows measured slower than cuBLAS (Spartacus batch 2: 1.78 vs 1.47 ms, H100)
GEMV_STAGES = 3
# ... except for inputs narrower than GEMV_NARROW_K (the ~100M models, launch-bound), where 2 rows run faster
# as the GEMV than as an add-norm kernel + cuBLAS (the batch-2 step on an H100, three rounds in turn:
# SmolLM2-135M 0.807 vs 0.939 ms, Kotodama-108M 0.896 vs 1.028, NeoLLM 0.441 vs 0.494,
# bench/results/decode_latency_narrow_rows-h100.json). 4 rows as the GEMV were slower than cuBLAS (SmolLM2
# batch 4: 1.173 vs 0.941 ms, decode_latency_gemv_rows-h100.json; not profiled: each row adds a reduction
# across the program's warps per K tile).
GEMV_NARROW_ROWS = 2
GEMV_NARROW_K = 2048


def gemv_rows(M: int, K: int) -> bool:
    """Whether an [M, K] input's matmul runs as the GEMV (else the multi-row GEMM or cuBLAS)."""
    return M <= GEMV_MAX_ROWS or (M <= GEMV_NARROW_ROWS and K < GEMV_NARROW_K)


def gemv_config(M: int, N: int, K: int, stacked: int = 1) -> tuple[int, int, int]:
    """(rows per program BN, K tile BK, warps) for `stacked` [N, K] weights read together.

    From bench/gemv_chain.py's sweep on H100 (bench/results/gemv_chain-h100.json, µs in a graph at batch 1):
    few or long rows want whole-row 2048-wide tiles and 8 warps (o 2048×2048: 3.8 vs 4.8 at (4, 1024, 4);
    down 2048×8192: 13.2 vs 14.9); a stacked [gate; up] pair 4 rows of 2048 (23.9); many short rows
    1024-wide tiles of 8 rows (qkvz 8192×2048: 14.6; the 128k-row head: 174 = 3.0 TB/s, vs 237 with
    2048-wide tiles). A second input row halves the tile (both rows' products stay in registers)."""
    p2 = triton.next_power_of_2(K)
    if K >= 4096 or N <= 2048:
        BN, BK, warps = 4, min(p2, 2048), 8
    elif stacked > 1:
        BN, BK, warps = 4, min(p2, 2048), 4
    else:
        BN, BK, warps = 8, min(p2, 1024), 4
    if M > 1:
        BK = max(BK // 2, min(p2, 256))
    while BN > 1 and N // BN < 256:        # small matrices: more programs rather than longer ones
        BN //= 2
    return BN, BK, warps


@triton.jit
def _gemv_out(acc, acc_up, scale, w_ptr, NORM: tl.constexpr, SILU_MUL: tl.constexpr):
    """A GEMV's outputs from its fp32 accumulators: times the input's 1/rms (`scale`) under NORM, rounded to
    the weight dtype as the reference's matmul stores them, then SiLU(gate) · up for a stacked pair."""
    y = acc
    if NORM:
        y = y * scale
    y = y.to(w_ptr.dtype.element_ty).to(tl.float32)
    if SILU_MUL:
        up = acc_up
        if NORM:
            up = up * scale
        up = up.to(w_ptr.dtype.element_ty).to(tl.float32)
        y = y / (1.0 + tl.exp(-y)) * up
    return y


@triton.jit
def _delta_as_stored(d, d_ptr, h_ptr):
    """A residual delta (fp32 values) as a matmul would have stored it in the residual's dtype: fp32 sums
    (kernels/attention_o*.py) rounded to it first; a delta already in that dtype passes through."""
    if d_ptr.dtype.element_ty != h_ptr.dtype.element_ty:
        d = d.to(h_ptr.dtype.element_ty).to(tl.float32)
    return d


@triton.jit
def _gemv_kernel(x_ptr, d_ptr, h_ptr, nw_ptr, w_ptr, y_ptr, M, N, K, sx, eps, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, ADD: tl.constexpr, NORM: tl.constexpr,
                 SILU_MUL: tl.constexpr, EW: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BN + tl.arange(0, BN)
    mn = n < N
    rows = n[:, None].to(tl.int64) * K
    rk = tl.arange(0, BK)
    rm = tl.arange(0, BM)
    m0 = mn[:, None] & (rk < K)[None, :]
    # weights are constant during the step: the first tile is read before the producer of x finishes
    w = tl.load(w_ptr + rows + rk[None, :], mask=m0, other=0.0, eviction_policy=EW)
    u = w
    if SILU_MUL:
        u = tl.load(w_ptr + N * K + rows + rk[None, :], mask=m0, other=0.0, eviction_policy=EW)
    if PDL:
        pdl.enter(PDL)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    ss = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        mk = kk < K
        if k0 > 0:
            m = mn[:, None] & mk[None, :]
            w = tl.load(w_ptr + rows + kk[None, :], mask=m, other=0.0, eviction_policy=EW)
            if SILU_MUL:
                u = tl.load(w_ptr + N * K + rows + kk[None, :], mask=m, other=0.0, eviction_policy=EW)
        wf = w.to(tl.float32)
        if NORM:
            nw = tl.load(nw_ptr + kk, mask=mk, other=0.0).to(tl.float32)
        for r in tl.static_range(BM):
            mx = mk & ((kk * 0 + r) < M)
            x = tl.load(x_ptr + r * sx + kk, mask=mx, other=0.0).to(tl.float32)
            if ADD:     # the residual stream as stored (rounded), then normalised, as add_rms_norm
                d = _delta_as_stored(tl.load(d_ptr + r * sx + kk, mask=mx, other=0.0).to(tl.float32), d_ptr, h_ptr)
                hx = (x + d).to(h_ptr.dtype.element_ty)
                if pid == 0:
                    tl.store(h_ptr + r * K + kk, hx, mask=mx)
                x = hx.to(tl.float32)
            sel = rm[:, None] == r
            if NORM:
                ss = tl.where(rm == r, ss + tl.sum(x * x, axis=0), ss)
                x = x * nw
            acc = tl.where(sel, acc + tl.sum(wf * x[None, :], axis=1)[None, :], acc)
            if SILU_MUL:
                acc_up = tl.where(sel, acc_up + tl.sum(u.to(tl.float32) * x[None, :], axis=1)[None, :], acc_up)
    y = _gemv_out(acc, acc_up, tl.rsqrt(ss / K + eps)[:, None], w_ptr, NORM, SILU_MUL)
    tl.store(y_ptr + rm[:, None] * N + n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & mn[None, :])


def _gemv_inputs(x, delta):
    """A GEMV's input rows and residual delta with unit column stride, and the tensor for x + delta (x itself
    without a delta; in x's dtype: a delta in another, fp32 sums, is rounded to it first): (x, delta, h)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    h = x
    if delta is not None:
        delta = delta if delta.stride(-1) == 1 else delta.contiguous()
        assert delta.stride(0) == x.stride(0), "x and delta rows must share a stride"
        h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return x, delta, h


def _gemv(x, delta, norm_weight, weight, out_features, eps, out_dtype=None, silu_mul=False, per_sm=None,
          after_block=False):
    """A few rows: returns (x + delta or x, y); per_sm: the streamed GEMV's programs per SM (None: its config's);
    after_block: see gemv_stream_config."""
    M, K = x.shape
    assert weight.is_contiguous() and weight.shape[-1] == K and gemv_rows(M, K)
    x, delta, h = _gemv_inputs(x, delta)
    y = torch.empty(M, out_features, dtype=out_dtype or x.dtype, device=x.device)
    if M == 0:
        return h, y
    stream = GEMV_STREAM and M == 1 and gemv_stream_config(out_features, K, 2 if silu_mul else 1, after_block)
    if stream and per_sm:
        stream = stream[:3] + (per_sm,) + stream[4:]
    if stream:
        _gemv_stream(x, delta, norm_weight, weight, h, y, eps, silu_mul, stream)
        return h, y
    BN, BK, warps = gemv_config(M, out_features, K, 2 if silu_mul else 1)
    _gemv_kernel[(triton.cdiv(out_features, BN),)](
        x, delta if delta is not None else x, h, norm_weight if norm_weight is not None else x, weight, y,
        M, out_features, K, x.stride(0), eps, BM=triton.next_power_of_2(M), BN=BN, BK=BK,
        ADD=delta is not None, NORM=norm_weight is not None, SILU_MUL=silu_mul, EW=WEIGHT_EVICT, num_warps=warps,
        num_stages=GEMV_STAGES, **pdl.launch_kwargs(x.device))
    return h, y


# The one-row GEMV as a stream: a grid of a few programs per SM, each reading one contiguous run of row
# blocks, tile after tile, the next tile's load issued before the current one's product (two tiles in
# flight per program). The runs differ by at most one block, and the next kernel (programmatic dependent
# launch) is released as soon as all have waited (capped at 64 registers all 4 of an SM's programs are resident; at
# the compiler's 78-94, 3 are, and the 4th starts as one of them leaves: see GEMV_STREAM_MAXNREG). The
# residual add / RMSNorm / SiLU·mul are those of _gemv_kernel. Used for rows of 2048+ (gemv_stream_config):
# whole batch-1 steps, plain → stream, alternating in one run (bench/results/gemv_stream_steps-h100.json):
# Spartacus 1.206 / 1.237 → 1.165 / 1.194 ms, Kotodama-3B 2.836 / 2.824 → 2.712 / 2.715, NanoHammer even.
GEMV_STREAM = True
# A register cap for the streamed GEMV (None: the compiler's choice, 78-94 per thread, which holds 3 of its
# 8-warp programs on an SM). Capped at 64 all 4 are resident. Whole batch-1 steps on an H100, three runs, the
# rounds of each within 0.2 %: Spartacus 1.162 → 1.152 ms, NanoHammer and Kotodama-3B even (bench/results/
# gemv_stream_maxnreg-h100.json); uncapped → 64 (decode_latency_before_block-h100.json, 3 rounds, and
# decode_latency_maxnreg-h100.json, 5 rounds) Llama-3.2-3B shapes 2.649 / 2.641 → 2.640 / 2.624, NanoHammer
# 1.118 / 1.117 → 1.109 / 1.110, Spartacus 1.077 / 1.076 → 1.072 / 1.071, Kotodama-3B 2.615 / 2.609 →
# 2.616 / 2.609. Capped where this Triton has the launch option (pdl.register_cap).
GEMV_STREAM_MAXNREG: int | None = 64


# Per-shape settings that win over the rules below, {(N, K, stacked): (BN, BK, warps, per SM, by rows)}: for
# A/B runs (bench/decode_latency.py's "stream:" variants).
GEMV_STREAM_SHAPES: dict[tuple[int, int, int], tuple[int, int, int, int, bool]] = {}
# The GEMV after a latency-bound block (`linear(after_block=True)`: the o projection after the attention):
# 1024-wide K tiles, 4 warps, 8 programs per SM (each then has one 4-row block at Llama-3.2-3B's 3072² and the
# 2048² of NanoHammer and Spartacus). H100 decode graphs, batch 1, context 128, three rounds in turn
# (bench/results/decode_latency_o_config-h100.json), the general setting → this one: Llama-3.2-3B shapes
# 2.643 → 2.627 ms, Kotodama-3B 2.615 → 2.586, NanoHammer 1.108 → 1.098, Spartacus 1.069 → 1.063; 2 rows a
# block, 2048-wide tiles, 8-row or 1-row blocks, 2 warps × 16 per SM: between the two. As the default, against
# the general setting (decode_latency_after_block-h100.json): 2.625 vs 2.629, 2.581 vs 2.610, 1.101 vs 1.109,
# 1.063 vs 1.070. Alone in chains of its own shape (bench/gemv_tail.py) it was even: the gain is in the step,
# after the attention's few programs, not found by the isolated sweep. None: the general setting.
AFTER_BLOCK_STREAM: tuple[int, int, int, int, bool] | None = (4, 1024, 4, 8, False)
# The L2 eviction policy of the one-row GEMVs' weight loads (streamed and plain). "evict_first": a step's
# weights, each byte read once, leave L2 before anything else, so what the next step reads again (the KV cache
# of a short context, states, norm weights, activations) stays there instead of coming back from HBM on the
# latency-bound path. H100, decode graphs, batch 1, context 128, three rounds in turn, "" → "evict_first"
# (bench/results/decode_latency_evict_final-h100.json; the same in decode_latency_evict-, _combos-, _mm- and
# _default-h100.json, each on another machine): Llama-3.2-3B shapes 2.620 → 2.599 ms, NanoHammer 1.104 → 1.085,
# Kotodama-3B 2.585 → 2.566, Spartacus 1.064 → 1.062, Kotodama-108M 0.607 → 0.577, NeoLLM 0.243 → 0.244;
# batch 8 even, and the multi-row matmul's weights with the hint were even at batch 8 and 32. The attention's
# k/v loads as "evict_last" (paged_attention_triton.KV_EVICT) added nothing. "": the default policy
# (HYBRIDSERVE_WEIGHT_EVICT="" for A/B). The opt-in Spartacus kernels built on the same stream (monoid_triton's
# PROJECTION_FUSED, spartacus_step_triton) keep the default policy: not measured with the hint.
WEIGHT_EVICT = os.environ.get("HYBRIDSERVE_WEIGHT_EVICT", "evict_first")


def gemv_stream_config(N: int, K: int, stacked: int = 1,
                       after_block: bool = False) -> tuple[int, int, int, int, bool] | None:
    """(rows per block BN, K tile BK, warps, programs per SM, runs split by rows) for `stacked` [N, K]
    weights, or None where the plain GEMV stays (rows shorter than 2048: the ~100M models, not measured with
    the stream). `after_block`: the GEMV's input comes from a latency-bound block (AFTER_BLOCK_STREAM).

    From bench/gemv_chain.py's stream sweep (H100, bench/results/gemv_chain_stream-h100.json, µs at batch 1):
    whole 2048-wide K tiles, 8 warps and 4 programs per SM; 4 rows a block (2 for a stacked [gate; up] pair):
    Spartacus qkvz 14.4 → 12.4, down 13.1 → 12.6; Kotodama-3B qkv 14.7 → 14.0, o 8.8 → 8.0, gate_up
    39.8 → 36.7, down 20.0 → 18.9 (the 2048-square o and the heads: even). Runs split by rows (a program's
    run may start inside a block; `_stream_span`) were slower in whole steps everywhere, with these tiles and
    with the after-block ones (bench/results/decode_latency_stream_rules-h100.json): A/B only."""
    if K < 2048:
        return None
    if (N, K, stacked) in GEMV_STREAM_SHAPES:
        return GEMV_STREAM_SHAPES[(N, K, stacked)]
    if after_block and AFTER_BLOCK_STREAM and stacked == 1:
        return AFTER_BLOCK_STREAM
    return (2 if stacked > 1 else 4), 2048, 8, 4, False


@lru_cache(maxsize=None)
def _sm_count(device_index: int | None) -> int:
    if device_index is None or not torch.cuda.is_available():
        return 4            # the interpreter: a few programs, each with several blocks
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for kernels whose last program to finish a group does the group's
    epilogue (and zeroes its counter again). Shared by every such call on the device, which therefore must
    not run concurrently with one another (one engine stream). Grown buffers are kept: graphs captured
    earlier still point at the old ones."""
    bufs = _COUNTERS.setdefault(device, [])
    if not bufs or bufs[-1].numel() < n:
        bufs.append(torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device))
    return bufs[-1]


@triton.jit
def _load_f32(p, m, CG: tl.constexpr = False):
    """A masked load as fp32; CG reads from L2, past this SM's L1 (for data other programs of the same kernel
    wrote: kernels/spartacus_step_triton.py)."""
    if CG:
        v = tl.load(p, mask=m, other=0.0, cache_modifier=".cg")
    else:
        v = tl.load(p, mask=m, other=0.0)
    return v.to(tl.float32)


@triton.jit
def _stream_x(x_ptr, d_ptr, h_ptr, nw_ptr, kk, mk, STORE_H, ADD: tl.constexpr, NORM: tl.constexpr,
              CG: tl.constexpr = False):
    """One K tile of the matmul's input: (x [+ delta, rounded as stored]) [* norm weight], and its x."""
    x = _load_f32(x_ptr + kk, mk, CG)
    if ADD:
        d = _delta_as_stored(_load_f32(d_ptr + kk, mk, CG), d_ptr, h_ptr)
        hx = (x + d).to(h_ptr.dtype.element_ty)
        if STORE_H:
            tl.store(h_ptr + kk, hx, mask=mk)
        x = hx.to(tl.float32)
    xn = x
    if NORM:
        xn = x * tl.load(nw_ptr + kk, mask=mk, other=0.0).to(tl.float32)
    return x, xn


@triton.jit
def _stream_span(N, pid, G, BN: tl.constexpr, KT: tl.constexpr, ROWS: tl.constexpr = False):
    """A program's share of a streamed GEMV: rows r0 … r1-1 in T tiles (KT per run of BN rows). Split by
    blocks of BN rows (the last block of the matrix may be short), or, ROWS, by rows: each program's run
    then starts anywhere and its last block may be short (`gemv_stream_config`'s last field)."""
    if ROWS:
        r0 = pid * N // G
        r1 = (pid + 1) * N // G
    else:
        nb = tl.cdiv(N, BN)
        r0 = (pid * nb // G) * BN
        r1 = tl.minimum(((pid + 1) * nb // G) * BN, N)
    return r0, r1, tl.cdiv(r1 - r0, BN) * KT


@triton.jit
def _row_of(r, h, NH: tl.constexpr, HD: tl.constexpr, GD: tl.constexpr, PD: tl.constexpr = 0):
    """The weight row of a streamed GEMV's output row r: r itself, or, with NH heads, row r of head h's own
    [q; k; v; gate] rows (HD, HD, HD and GD of them) inside a [q | k | v | gate] weight
    (kernels/monoid_triton.py `projection_decode`: a program's rows all belong to one head), or, with PD (a
    head dim), rows in RoPE pairs: each run of 4 is dims 2t, 2t+1, 2t+PD/2, 2t+1+PD/2 of one head, so a
    4-row tile holds both halves of what it rotates (`add_norm_linear_rope_kv`)."""
    if PD > 0:
        d = r % PD
        return r - d + (d // 4) * 2 + d % 2 + ((d // 2) % 2) * (PD // 2)
    if NH == 0:
        return r
    W = NH * HD
    sec = r // HD
    return tl.where(r < 3 * HD, sec * W + h * HD + (r - sec * HD), 3 * W + h * GD + (r - 3 * HD))


@triton.jit
def _stream_tile(w_ptr, N, K, r0, r1, t, T, BN: tl.constexpr, BK: tl.constexpr, KT: tl.constexpr,
                 SILU_MUL: tl.constexpr, h=0, NH: tl.constexpr = 0, HD: tl.constexpr = 0, GD: tl.constexpr = 0,
                 PD: tl.constexpr = 0, EW: tl.constexpr = ""):
    """Weight tile t of a program's run of rows r0 … r1-1 (`_stream_span`; zeros past its end), and its [up]
    half for a stacked pair (N rows on); NH > 0: the rows of head h; PD > 0: rows in RoPE pairs (`_row_of`).
    EW: the loads' L2 eviction policy (WEIGHT_EVICT; "" the default). Callers pass EW (and `_stream_rows`'): Triton
    3.6 does not take a string default as a constant."""
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    r = r0 + (t // KT) * BN + rn
    k = (t % KT) * BK + rk
    m = ((r < r1) & (rn * 0 + t < T))[:, None] & (k < K)[None, :]
    off = _row_of(r, h, NH, HD, GD, PD)[:, None].to(tl.int64) * K + k[None, :]
    w = tl.load(w_ptr + off, mask=m, other=0.0, eviction_policy=EW)
    u = w
    if SILU_MUL:
        u = tl.load(w_ptr + N * K + off, mask=m, other=0.0, eviction_policy=EW)
    return w, u


@triton.jit
def _stream_rows(x_ptr, d_ptr, h_ptr, nw_ptr, w_ptr, y_ptr, N, K, eps, r0, r1, T, w, u, STORE_H,
                 BN: tl.constexpr, BK: tl.constexpr, KT: tl.constexpr, ADD: tl.constexpr, NORM: tl.constexpr,
                 SILU_MUL: tl.constexpr, CG: tl.constexpr, h=0, NH: tl.constexpr = 0, HD: tl.constexpr = 0,
                 GD: tl.constexpr = 0, PD: tl.constexpr = 0, NQ: tl.constexpr = 0, NKV: tl.constexpr = 0,
                 cos_ptr=0, sin_ptr=0, kc_ptr=0, vc_ptr=0, slot_ptr=0, EW: tl.constexpr = ""):
    """A program's run (rows r0 … r1-1 in T tiles) of a streamed GEMV, its first weight tile (w, u) already
    loaded; NH > 0: the rows of head h, PD > 0: rows in RoPE pairs (`_row_of`), each output stored at its
    weight row's place (PD: as `_rope_kv_store` stores it)."""
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    ss = 0.0
    x, xn = _stream_x(x_ptr, d_ptr, h_ptr, nw_ptr, rk, rk < K, STORE_H, ADD, NORM, CG)
    if NORM:
        ss = tl.sum(x * x, axis=0)
    if KT > 1:
        if NORM or ADD:      # the whole row's sum of squares (and the stored residual) before the stream
            for kt in range(1, KT):
                kk = kt * BK + rk
                x2, _ = _stream_x(x_ptr, d_ptr, h_ptr, nw_ptr, kk, kk < K, STORE_H, ADD, False, CG)
                if NORM:
                    ss += tl.sum(x2 * x2, axis=0)
    acc = tl.zeros((BN,), dtype=tl.float32)
    acc_up = tl.zeros((BN,), dtype=tl.float32)
    for t in range(0, T):
        kt = t % KT
        # the next tile's load goes out before this tile's product
        w_next, u_next = _stream_tile(w_ptr, N, K, r0, r1, t + 1, T, BN, BK, KT, SILU_MUL, h, NH, HD, GD, PD, EW)
        if KT > 1:
            if CG:      # x comes from L2: its next tile goes out with the next weight tile
                kn = ((t + 1) % KT) * BK + rk
                _, xn_next = _stream_x(x_ptr, d_ptr, h_ptr, nw_ptr, kn, kn < K, False, ADD, NORM, CG)
            else:
                kk = kt * BK + rk
                _, xn = _stream_x(x_ptr, d_ptr, h_ptr, nw_ptr, kk, kk < K, False, ADD, NORM, CG)
        acc += tl.sum(w.to(tl.float32) * xn[None, :], axis=1)
        if SILU_MUL:
            acc_up += tl.sum(u.to(tl.float32) * xn[None, :], axis=1)
        if kt == KT - 1:
            y = _gemv_out(acc, acc_up, tl.rsqrt(ss / K + eps), w_ptr, NORM, SILU_MUL)
            r = r0 + (t // KT) * BN + rn
            if PD > 0:
                _rope_kv_store(y, r, r1, y_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, NQ, NKV, PD)
            else:
                tl.store(y_ptr + _row_of(r, h, NH, HD, GD), y.to(y_ptr.dtype.element_ty), mask=r < r1)
            acc = tl.zeros((BN,), dtype=tl.float32)
            acc_up = tl.zeros((BN,), dtype=tl.float32)
        w = w_next
        u = u_next
        if KT > 1:
            if CG:
                xn = xn_next


@triton.jit
def _rope_kv_store(y, r, N, y_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, NQ: tl.constexpr, NKV: tl.constexpr,
                   PD: tl.constexpr):
    """A 4-row tile (rows in RoPE pairs, `_row_of`) of one token's q|k|v projection, stored as rope_write_kv
    leaves it: q and k heads rotated (rotate-half, this token's cos/sin rows), all heads at their rows of
    y, and k and v heads also at the token's slot of the KV cache."""
    n = _row_of(r, 0, 0, 0, 0, PD)
    d = n % PD
    head = n // PD
    # each element's partner (the other half of its rotation) is two places over: (y2, y3, y0, y1)
    a, b = tl.split(tl.permute(tl.reshape(y, (2, 2)), (1, 0)))
    yp = tl.reshape(tl.permute(tl.join(b, a), (1, 0)), (4,))
    c = tl.load(cos_ptr + d).to(tl.float32)
    s = tl.load(sin_ptr + d).to(tl.float32)
    y = _rotate_half(y, yp, c, s, d, head < NQ + NKV, PD // 2).to(y_ptr.dtype.element_ty)
    m = r < N
    tl.store(y_ptr + n, y, mask=m)
    slot = tl.load(slot_ptr).to(tl.int64)
    tl.store(kc_ptr + (slot * NKV + head - NQ) * PD + d, y.to(kc_ptr.dtype.element_ty),
             mask=m & (head >= NQ) & (head < NQ + NKV))
    tl.store(vc_ptr + (slot * NKV + head - NQ - NKV) * PD + d, y.to(vc_ptr.dtype.element_ty),
             mask=m & (head >= NQ + NKV))


@triton.jit
def _gemv_stream_kernel(x_ptr, d_ptr, h_ptr, nw_ptr, w_ptr, y_ptr, N, K, eps, BN: tl.constexpr,
                        BK: tl.constexpr, KT: tl.constexpr, ADD: tl.constexpr, NORM: tl.constexpr,
                        SILU_MUL: tl.constexpr, ROWS: tl.constexpr, EW: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    r0, r1, T = _stream_span(N, pid, tl.num_programs(0), BN, KT, ROWS)
    # weights are constant during the step: the first tile is read before the producer of x finishes
    w, u = _stream_tile(w_ptr, N, K, r0, r1, 0, T, BN, BK, KT, SILU_MUL, EW=EW)
    if PDL:
        pdl.enter(PDL)
    _stream_rows(x_ptr, d_ptr, h_ptr, nw_ptr, w_ptr, y_ptr, N, K, eps, r0, r1, T, w, u, pid == 0, BN, BK, KT,
                 ADD, NORM, SILU_MUL, False, EW=EW)


@triton.jit
def _gemv_rope_kv_kernel(x_ptr, d_ptr, h_ptr, nw_ptr, w_ptr, y_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, N,
                         K, eps, NQ: tl.constexpr, NKV: tl.constexpr, PD: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr, KT: tl.constexpr, ADD: tl.constexpr, EW: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    r0, r1, T = _stream_span(N, pid, tl.num_programs(0), BN, KT)
    w, u = _stream_tile(w_ptr, N, K, r0, r1, 0, T, BN, BK, KT, False, 0, 0, 0, 0, PD, EW)
    if PDL:
        pdl.enter(PDL)
    _stream_rows(x_ptr, d_ptr, h_ptr, nw_ptr, w_ptr, y_ptr, N, K, eps, r0, r1, T, w, u, pid == 0, BN, BK, KT,
                 ADD, True, False, False, 0, 0, 0, 0, PD, NQ, NKV, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, EW)


def _stream_grid(N: int, BN: int, per_sm: int, rows: bool, device: torch.device) -> int:
    """Programs of a streamed GEMV over N rows: per_sm per SM, at most one per row block of BN (per row where its
    runs are split by rows)."""
    return min(N if rows else triton.cdiv(N, BN), per_sm * _sm_count(device.index if device.type == "cuda" else None))


def _gemv_stream(x, delta, norm_weight, weight, h, y, eps, silu_mul, config):
    N, K = y.shape[1], x.shape[1]
    BN, BK, warps, per_sm, rows = config
    _gemv_stream_kernel[(_stream_grid(N, BN, per_sm, rows, x.device),)](
        x, delta if delta is not None else x, h, norm_weight if norm_weight is not None else x, weight, y,
        N, K, eps, BN=BN, BK=BK, KT=triton.cdiv(K, BK), ADD=delta is not None, NORM=norm_weight is not None,
        SILU_MUL=silu_mul, ROWS=rows, EW=WEIGHT_EVICT, num_warps=warps, num_stages=1,
        **pdl.launch_kwargs(x.device),
        **pdl.register_cap(GEMV_STREAM_MAXNREG, x.device))


# The one-row GEMV after a latency-bound block (the o projection after the attention, `linear(after_block=
# True)`) with its whole weight in registers before its input exists. Its programs launch while the block
# runs (the block's kernels release the next launch before their waits, as pdl.EARLY_MIXER does), each loads
# its R rows × K (48 KB at R = 8, K = 3072; 3 programs an SM hold Llama-3.2-3B's 18.9 MB o weight), then waits;
# once the attention's output is written only L2 reads of x, the products and one store are left. The bus
# streams the weight while the block runs instead of after it. Off: slower. The block's dependent loads queue
# behind the weight's, and the programs find no room until the q|k|v GEMV has left (its 4 capped programs fill an
# SM's registers), so many load after the block all the same. H100, decode graphs, batch 1, context 128, three
# rounds in turn (bench/results/decode_latency_resident_o-h100.json), default / resident with the mixer's early
# release / resident alone / early release alone: Llama-3.2-3B shapes 2.641 / 2.779 / 2.685 / 2.740 ms, Spartacus
# 1.071 / 1.092 / 1.080 / 1.095, NanoHammer 1.110 / 1.099 / 1.110 / 1.103 (4 rows, 2 warps: 1.095). The model of
# it (bench/l2_prefetch.py, resident_gemv_*-h100.json): a 2 µs block then the o GEMV 12.78 µs a pair, 11.66 with
# the block's early release, 13.05 resident; the resident GEMV alone 8.92 µs against the streamed one's 7.81.
# An A/B knob (HYBRIDSERVE_RESIDENT_O=1, with HYBRIDSERVE_PDL_EARLY_MIXER=1 for the early launch;
# decode_latency.py's resident_o variants set both).
RESIDENT_AFTER_BLOCK = os.environ.get("HYBRIDSERVE_RESIDENT_O", "0") == "1"
RESIDENT_ROWS = 8
RESIDENT_WARPS = 4
RESIDENT_BK = 1024
RESIDENT_MAX_TILES = 4


@triton.jit
def _resident_tile(w_ptr, rows, K, t, BK: tl.constexpr):
    k = t * BK + tl.arange(0, BK)
    return tl.load(w_ptr + rows[:, None].to(tl.int64) * K + k[None, :], mask=(k < K)[None, :], other=0.0)


@triton.jit
def _resident_x(x_ptr, K, t, BK: tl.constexpr):
    k = t * BK + tl.arange(0, BK)
    return tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)


@triton.jit
def _gemv_resident_kernel(x_ptr, w_ptr, y_ptr, N, K, R: tl.constexpr, BK: tl.constexpr, KT: tl.constexpr,
                          PDL: tl.constexpr):
    r = tl.program_id(0) * R + tl.arange(0, R)
    rows = tl.minimum(r, N - 1)          # in bounds; the store is masked
    # the whole run of rows, before the wait (weights are constant during the step)
    w0 = _resident_tile(w_ptr, rows, K, 0, BK)
    if KT > 1:
        w1 = _resident_tile(w_ptr, rows, K, 1, BK)
    if KT > 2:
        w2 = _resident_tile(w_ptr, rows, K, 2, BK)
    if KT > 3:
        w3 = _resident_tile(w_ptr, rows, K, 3, BK)
    if PDL:
        pdl.enter(PDL)
    # every x tile's load goes out before the first product
    x0 = _resident_x(x_ptr, K, 0, BK)
    if KT > 1:
        x1 = _resident_x(x_ptr, K, 1, BK)
    if KT > 2:
        x2 = _resident_x(x_ptr, K, 2, BK)
    if KT > 3:
        x3 = _resident_x(x_ptr, K, 3, BK)
    y = tl.sum(w0.to(tl.float32) * x0[None, :], axis=1)
    if KT > 1:
        y += tl.sum(w1.to(tl.float32) * x1[None, :], axis=1)
    if KT > 2:
        y += tl.sum(w2.to(tl.float32) * x2[None, :], axis=1)
    if KT > 3:
        y += tl.sum(w3.to(tl.float32) * x3[None, :], axis=1)
    tl.store(y_ptr + r, y.to(y_ptr.dtype.element_ty), mask=r < N)


def resident_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear(x, weight, after_block=True)` runs the resident GEMV: on, one row on a GPU, a weight of
    at most RESIDENT_MAX_TILES K tiles."""
    return (RESIDENT_AFTER_BLOCK and x.is_cuda and x.shape[0] == 1 and weight.is_contiguous()
            and x.shape[1] <= RESIDENT_MAX_TILES * RESIDENT_BK)


def _gemv_resident(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    N, K = weight.shape
    x = x.contiguous()
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    _gemv_resident_kernel[(triton.cdiv(N, RESIDENT_ROWS),)](
        x, weight, y, N, K, R=RESIDENT_ROWS, BK=RESIDENT_BK, KT=triton.cdiv(K, RESIDENT_BK),
        num_warps=RESIDENT_WARPS, num_stages=1, **pdl.launch_kwargs(x.device))
    return y


# Matmuls of more rows (batch 2 … MM_MAX_ROWS) run as a tensor-core GEMM of one row block: the weight
# streams once, the few activation rows come from L2. It takes SiLU·mul of a stacked [gate; up] weight
# (two accumulators) and the fp32 cast of the logits into its epilogue. Tiles per shape from a measured
# rule (mm_config); a shape with too few column blocks to fill the GPU stays on cuBLAS (its split-K).
MM_MAX_ROWS = 128


def mm_config(M: int, N: int, K: int, stacked: int = 1) -> tuple[int, int, int, int, int] | None:
    """(BM, BN, BK, warps, stages) of the multi-row GEMM for an [M, K] x [N, K]^T product, or None: cuBLAS.

    From bench/gemm_rows.py on H100 (bench/results/gemm_rows-h100.json, µs per matmul in a graph, Spartacus
    shapes): up to 32 rows, 32-column tiles over 128-wide K steps win on the wide matrices (M = 16: qkvz
    8192×2048 13.8 vs cuBLAS 14.9, gate_up 24.8 vs 28.7, the 128k head 180 vs 200) and 16-column ones on a
    square 2048×2048 (6.0 vs 6.5); a long-K matrix with few columns (down 2048×8192) stays on cuBLAS's
    split-K (17.1 vs 17.7). At 128 rows only the wide ones win (gate_up 28.7 vs 32.6, head 219 vs 262;
    o 9.3 vs 7.0 and down 28.7 vs 19.5 lose). Rows narrower than 1024 (the ~100M models) were not swept.
    It launches without programmatic dependent launch: in the Spartacus step at batch 2 / 8 that measured
    1.59 / 1.64 ms with it, 1.43 / 1.52 without (cuBLAS 1.51 / 1.60)."""
    BM = max(16, triton.next_power_of_2(M))
    if BM > MM_MAX_ROWS or K < 1024:     # narrow rows (the ~100M models) were not swept: cuBLAS
        return None
    if BM <= 32:
        if N >= 4096:
            return BM, 32, 128, 4, 3 if stacked > 1 else 5
        return (BM, 16, 128, 4, 5) if K <= 2 * N and N >= 1024 else None
    return (BM, 64, 128, 8, 3 if stacked > 1 else 4) if N >= 8192 else None


@triton.jit(do_not_specialize=["M"])   # the step's token count: one variant for all
def _mm_kernel(x_ptr, w_ptr, y_ptr, M, N, K, sx, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               SILU_MUL: tl.constexpr, F32_DOT: tl.constexpr, PDL: tl.constexpr):
    pid_n = tl.program_id(0)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mm, mn = rm < M, rn < N
    xs = x_ptr + rm[:, None].to(tl.int64) * sx + rk[None, :]
    ws = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    if PDL:   # kernels/pdl.py (launched without it: its early start measured slower, bench/NOTES.md)
        pdl.enter(PDL)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        mk = (k0 + rk) < K
        a = tl.load(xs + k0, mask=mm[:, None] & mk[None, :], other=0.0)
        b = tl.load(ws + k0, mask=mn[:, None] & mk[None, :], other=0.0)
        if F32_DOT:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc)
        if SILU_MUL:
            u = tl.load(ws + N * K + k0, mask=mn[:, None] & mk[None, :], other=0.0)
            if F32_DOT:
                u = u.to(tl.float32)
            acc_up = tl.dot(a, tl.trans(u), acc_up)
    y = acc.to(w_ptr.dtype.element_ty).to(tl.float32)          # the matmul's stored output, as the reference
    if SILU_MUL:
        up = acc_up.to(w_ptr.dtype.element_ty).to(tl.float32)
        y = y / (1.0 + tl.exp(-y)) * up
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


# Triton's CPU interpreter mis-computes tl.dot on bf16 operands (seen with triton 3.9): it upcasts there.
_INTERPRETED = type(_mm_kernel).__name__ == "InterpretedFunction"


def _matmul(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None,
            gated: bool = False) -> torch.Tensor:
    """x [M, K] @ weight.T, or SiLU·mul of its [gate; up] halves when gated, cast to out_dtype."""
    M, K = x.shape
    N = weight.shape[0] // 2 if gated else weight.shape[0]
    half = x.dtype in (torch.bfloat16, torch.float16) and x.dtype == weight.dtype  # fp32: cuBLAS, no TF32
    cfg = mm_config(M, N, K, 2 if gated else 1) if half and (x.is_cuda or _INTERPRETED) else None
    if cfg is None or not weight.is_contiguous():
        y = F.linear(x, weight)
        y = silu_mul(y) if gated else y
        return y if out_dtype is None else y.to(out_dtype)
    x = x if x.stride(-1) == 1 else x.contiguous()
    BM, BN, BK, warps, stages = cfg
    y = torch.empty(M, N, dtype=out_dtype or x.dtype, device=x.device)
    if M:
        _mm_kernel[(triton.cdiv(N, BN), triton.cdiv(M, BM))](
            x, weight, y, M, N, K, x.stride(0), BM=BM, BN=BN, BK=BK, SILU_MUL=gated, F32_DOT=_INTERPRETED,
            num_warps=warps, num_stages=stages, PDL=False)
    return y


def _add_norm(h, delta, norm_weight, eps):
    return add_rms_norm(delta, h, norm_weight, eps) if delta is not None else (h, rms_norm(h, norm_weight, eps))


def linear(x: torch.Tensor, weight: torch.Tensor, side: bool = False, after_block: bool = False) -> torch.Tensor:
    if after_block and resident_applies(x, weight):
        return _gemv_resident(x, weight)
    # on a side stream (NanoHammer's state entries) two narrow rows keep cuBLAS: as the GEMV they slowed its
    # batch-2 step (1.376 vs 1.331 ms, bench/results/decode_latency_narrow_rows-h100.json)
    gemv = x.shape[0] <= GEMV_MAX_ROWS if side else gemv_rows(*x.shape)
    if not gemv:
        return _matmul(x, weight)
    return _gemv(x, None, None, weight, weight.shape[0], 0.0, after_block=after_block)[1]


# The streamed GEMV's programs per SM where a latency-bound kernel follows it (the q|k|v projection before RoPE
# and the attention, Spartacus's q|k|v|z before the recurrence step), None: the config's 4, of which 3 are
# resident at once, so the last quarter runs as a thin tail that the short kernel after it cannot overlap
# (a GEMV after it can: its first tiles load meanwhile). bench/l2_prefetch.py (H100, o-projection shapes of
# Llama-3.2-3B, bench/results/l2_prefetch-h100.json): a GEMV and a 2 µs latency-bound kernel in turn
# 12.92 µs a pair with 4 per SM, 11.99 with 3; GEMVs alone in a chain 7.96 vs 8.39 µs.
BEFORE_BLOCK_PER_SM: int | None = None


def add_norm_linear(h: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, weight: torch.Tensor,
                    eps: float, out_dtype: torch.dtype | None = None,
                    before_block: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """See kernels/fused.py; before_block: a latency-bound kernel comes next (BEFORE_BLOCK_PER_SM)."""
    if not gemv_rows(*h.shape):
        h, x = _add_norm(h, delta, norm_weight, eps)
        return h, _matmul(x, weight, out_dtype)
    return _gemv(h, delta, norm_weight, weight, weight.shape[0], eps, out_dtype,
                 per_sm=BEFORE_BLOCK_PER_SM if before_block else None)


# A batch-1 decode step's attention projection with RoPE and the KV write in its epilogue
# (`add_norm_linear_rope_kv`): the streamed GEMV's 4-row tiles hold RoPE pairs, so each program rotates what it
# computed and stores k/v into the cache itself; the rope_write_kv kernel and its boundary leave the step.
# Off: slower where measured. NanoHammer batch 1 on an H100, three rounds in turn in one process: 1.128 ms with
# the separate kernel, 1.161 with it in the epilogue (bench/results/decode_latency_rope_in_gemv-h100.json).
# Each tile's store waits on its own cos/sin loads (L2) and a register shuffle for the partner rows, inside
# the weight stream's loop (not profiled further). An A/B knob; models with QK-norm never take it.
ROPE_IN_GEMV = False


def add_norm_linear_rope_kv(h: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor,
                            weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                            k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                            q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                            prefetch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """See kernels/fused.py. One row, full rotary, no QK-norm, a streamed GEMV shape: one kernel; otherwise
    `add_norm_linear`, then `rope_write_kv` (which prefetches `prefetch` into L2)."""
    hkv, D = k_cache.shape[2], k_cache.shape[3]
    N, K = weight.shape
    config = gemv_stream_config(N, K)
    if not (ROPE_IN_GEMV and GEMV_STREAM and config and config[0] == 4 and h.shape[0] == 1 and q_norm is None
            and k_norm is None and cos.shape[-1] == D and D % 4 == 0 and weight.is_contiguous()
            and slot_mapping.shape[0] == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()):
        h, qkv = add_norm_linear(h, delta, norm_weight, weight, eps, before_block=True)
        q = rope_write_kv(qkv.view(h.shape[0], -1, D), cos, sin, num_heads, k_cache, v_cache, slot_mapping, q_norm,
                          k_norm, eps, prefetch)
        return h, q[:, :num_heads]
    x, delta, h = _gemv_inputs(h, delta)
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    BN, BK, warps, per_sm, _ = config     # RoPE pairs need whole blocks: never split by rows
    _gemv_rope_kv_kernel[(_stream_grid(N, BN, per_sm, False, x.device),)](
        x, delta if delta is not None else x, h, norm_weight, weight, y, cos.contiguous(), sin.contiguous(),
        k_cache, v_cache, slot_mapping, N, K, eps, NQ=num_heads, NKV=hkv, PD=D, BN=BN, BK=BK,
        KT=triton.cdiv(K, BK), ADD=delta is not None, EW=WEIGHT_EVICT, num_warps=warps, num_stages=1,
        **pdl.launch_kwargs(x.device))
    return h, y.view(1, -1, D)[:, :num_heads]


def add_norm_linear_silu_mul(h: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor,
                             gate_up: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not gemv_rows(*h.shape):
        h, x = _add_norm(h, delta, norm_weight, eps)
        return h, _matmul(x, gate_up, gated=True)
    return _gemv(h, delta, norm_weight, gate_up, gate_up.shape[0] // 2, eps, silu_mul=True)


@triton.jit
def _log1p(x):
    """log(1 + x) for x in [0, 1], exact for tiny x too (tl.log(1 + x) rounds 1 + x first)."""
    y = 1.0 + x
    d = y - 1.0
    return tl.where(d == 0.0, x, tl.log(y) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _log_decay(row, zb_ptr, zo, zm, HAS_ZB: tl.constexpr, SOFTPLUS: tl.constexpr, CG: tl.constexpr = False):
    """log α from the gate logits row[zo] (+ bias): log σ(z), or −softplus(z), in fp32, exact in the tails."""
    z = _load_f32(row + zo, zm, CG)
    if HAS_ZB:
        z += tl.load(zb_ptr + zo, mask=zm, other=0.0).to(tl.float32)
    soft = _log1p(tl.exp(-tl.abs(z)))
    if SOFTPLUS:
        return -(tl.maximum(z, 0.0) + soft)
    return tl.minimum(z, 0.0) - soft


@triton.jit
def _head_norm(x, w_ptr, hd, d, m, eps, D: tl.constexpr, W: tl.constexpr, FULL: tl.constexpr):
    if FULL:
        r = tl.rsqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / W + eps)
        w = tl.load(w_ptr + hd, mask=m, other=0.0).to(tl.float32)
    else:
        r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
        w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
    return x * r * w


@triton.jit
def _monoid_prep_kernel(x_ptr, qw_ptr, kw_ptr, zb_ptr, q_ptr, k_ptr, la_ptr, sx, eps,
                        H: tl.constexpr, D: tl.constexpr, GD: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr,
                        Q_FULL: tl.constexpr, K_FULL: tl.constexpr, HAS_ZB: tl.constexpr,
                        SOFTPLUS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)[:, None]
    d = tl.arange(0, BD)[None, :]
    m = (h < H) & (d < D)
    hd = h * D + d
    W = H * D
    row = x_ptr + t * sx
    q = _head_norm(tl.load(row + hd, mask=m, other=0.0).to(tl.float32), qw_ptr, hd, d, m, eps, D, W, Q_FULL)
    k = _head_norm(tl.load(row + W + hd, mask=m, other=0.0).to(tl.float32), kw_ptr, hd, d, m, eps, D, W, K_FULL)
    k = k.to(k_ptr.dtype.element_ty).to(tl.float32)     # SiLU of the stored norm, as the reference
    k = k / (1.0 + tl.exp(-k))
    tl.store(q_ptr + t * W + hd, q.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(k_ptr + t * W + hd, k.to(k_ptr.dtype.element_ty), mask=m)
    if GD == 1:            # one gate per head, the same decay on every key dim
        zm = h < H
        zo = h
    else:
        zm = m
        zo = hd
    la = _log_decay(row + 3 * W, zb_ptr, zo, zm, HAS_ZB, SOFTPLUS)
    tl.store(la_ptr + t * W + hd, tl.broadcast_to(la, (BH, BD)), mask=m)


def monoid_prep(qkvz: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor, decay_bias: torch.Tensor | None,
                num_heads: int, head_dim: int, eps: float, decay_gate: str):
    T = qkvz.shape[0]
    H, D = num_heads, head_dim
    W = H * D
    if qkvz.stride(-1) != 1:
        qkvz = qkvz.contiguous()
    q = torch.empty(T, H, D, dtype=qkvz.dtype, device=qkvz.device)
    k = torch.empty_like(q)
    log_a = torch.empty(T, H, D, dtype=torch.float32, device=qkvz.device)
    q_full, k_full = q_norm.numel() == W, k_norm.numel() == W
    BD = triton.next_power_of_2(D)
    # a few heads per program (more programs, shorter each); a full-width norm needs the whole row
    BH = triton.next_power_of_2(H) if q_full or k_full else min(triton.next_power_of_2(H), max(1, 256 // BD))
    if T:
        _monoid_prep_kernel[(T, triton.cdiv(H, BH))](
            qkvz, q_norm, k_norm, decay_bias if decay_bias is not None else q_norm, q, k, log_a, qkvz.stride(0),
            eps, H=H, D=D, GD=(qkvz.shape[1] - 3 * W) // H, BH=BH, BD=BD, Q_FULL=q_full, K_FULL=k_full,
            HAS_ZB=decay_bias is not None, SOFTPLUS=decay_gate == "neg_softplus",
            num_warps=4 if BH * BD >= 1024 else 2)
    v = qkvz[:, 2 * W:3 * W].view(T, H, D)
    return q, k, v, log_a


@triton.jit
def _rope_write_kv_kernel(x_ptr, cos_ptr, sin_ptr, qk_ptr, kc_ptr, vc_ptr, slot_ptr, qn_ptr, kn_ptr, n_cached,
                          sx_t, sx_h, sc_t, eps, pf_ptr, pf_bytes, pf2_ptr, pf2_bytes, H: tl.constexpr,
                          HKV: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr, HALF: tl.constexpr, BH: tl.constexpr,
                          BD: tl.constexpr, NORM_LO: tl.constexpr, NORM_HI: tl.constexpr, PF_PARTS: tl.constexpr,
                          PF_LANES: tl.constexpr, PF_CHUNK: tl.constexpr, PF_LINES: tl.constexpr,
                          PF_EARLY: tl.constexpr, PDL: tl.constexpr):
    NHB: tl.constexpr = (H + 2 * HKV + BH - 1) // BH
    if PF_PARTS > 0:   # kernels/l2_prefetch.py: program (t, NHB + j), past the heads', is prefetch part t·PF_PARTS + j
        l2_prefetch.enter(PDL, tl.program_id(1) >= NHB, pf_ptr, pf_bytes, pf2_ptr, pf2_bytes,
                          tl.program_id(0) * PF_PARTS + tl.program_id(1) - NHB, tl.num_programs(0) * PF_PARTS,
                          PF_LANES, PF_CHUNK, PF_LINES, PF_EARLY)
    elif PDL:   # kernels/pdl.py: nothing is read or written before the wait
        pdl.enter(PDL)
    if tl.program_id(1) < NHB:
        _rope_write_kv_rows(x_ptr, cos_ptr, sin_ptr, qk_ptr, kc_ptr, vc_ptr, slot_ptr, qn_ptr, kn_ptr, n_cached,
                            sx_t, sx_h, sc_t, eps, H, HKV, D, ROT, HALF, BH, BD, NORM_LO, NORM_HI)


@triton.jit
def _rope_write_kv_rows(x_ptr, cos_ptr, sin_ptr, qk_ptr, kc_ptr, vc_ptr, slot_ptr, qn_ptr, kn_ptr, n_cached,
                        sx_t, sx_h, sc_t, eps, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                        ROT: tl.constexpr, HALF: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr,
                        NORM_LO: tl.constexpr, NORM_HI: tl.constexpr):
    """One token's block of BH heads (program (t, head block))."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)[:, None]
    d = tl.arange(0, BD)[None, :]
    NQK = H + HKV
    m = (h < NQK + HKV) & (d < D)
    x = tl.load(x_ptr + t * sx_t + h * sx_h + d, mask=m, other=0.0).to(tl.float32)
    is_rot = (d < ROT) & (h < NQK)
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    xp = tl.load(x_ptr + t * sx_t + h * sx_h + partner, mask=m & is_rot, other=0.0).to(tl.float32)
    if NORM_HI > NORM_LO:   # QK-norm of heads [NORM_LO, NORM_HI): the partner shares its head's scale
        r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
        w = tl.where(h < H, tl.load(qn_ptr + d, mask=d < D, other=0.0), tl.load(kn_ptr + d, mask=d < D, other=0.0))
        wp = tl.where(h < H, tl.load(qn_ptr + partner, mask=d < ROT, other=0.0),
                      tl.load(kn_ptr + partner, mask=d < ROT, other=0.0))
        normed = (h >= NORM_LO) & (h < NORM_HI)
        # rounded to the model dtype before the rotation, as the unfused norm stores it
        x = tl.where(normed, (x * r * w.to(tl.float32)).to(qk_ptr.dtype.element_ty).to(tl.float32), x)
        xp = tl.where(normed, (xp * r * wp.to(tl.float32)).to(qk_ptr.dtype.element_ty).to(tl.float32), xp)
    c = tl.load(cos_ptr + t * sc_t + d, mask=d < ROT, other=1.0).to(tl.float32)
    s = tl.load(sin_ptr + t * sc_t + d, mask=d < ROT, other=0.0).to(tl.float32)
    y = _rotate_half(x, xp, c, s, d, is_rot, HALF)
    tl.store(qk_ptr + (t * NQK + h) * D + d, y.to(qk_ptr.dtype.element_ty), mask=m & (h < NQK))
    if t < n_cached:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        is_k = (h >= H) & (h < NQK)
        tl.store(kc_ptr + (slot * HKV + (h - H)) * D + d, y.to(kc_ptr.dtype.element_ty), mask=m & is_k)
        tl.store(vc_ptr + (slot * HKV + (h - NQK)) * D + d, y.to(vc_ptr.dtype.element_ty), mask=m & (h >= NQK))


def rope_write_kv(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor, q_norm: torch.Tensor | None = None,
                  k_norm: torch.Tensor | None = None, eps: float = 1e-5,
                  prefetch=None) -> torch.Tensor:
    T, heads, D = x.shape
    hkv = (heads - num_heads) // 2
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[2:] == (hkv, D)
    assert all(w is None or w.numel() == D for w in (q_norm, k_norm)), "QK-norm weights are per head"
    lo = 0 if q_norm is not None else num_heads
    hi = num_heads + hkv if k_norm is not None else num_heads
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    rot = cos.shape[-1]
    qk = torch.empty(T, num_heads + hkv, D, dtype=x.dtype, device=x.device)
    BH = min(triton.next_power_of_2(heads), 16)
    warps = 1 if BH * D <= 1024 else 4
    pf, pf_bytes, pf2, pf2_bytes, parts = l2_prefetch.plan(prefetch, x.device)
    if T:
        _rope_write_kv_kernel[(T, triton.cdiv(heads, BH) + parts)](
            x, cos, sin, qk, k_cache, v_cache, slot_mapping, q_norm if q_norm is not None else x,
            k_norm if k_norm is not None else x, slot_mapping.shape[0], x.stride(0), x.stride(1), cos.stride(0), eps,
            pf if pf is not None else x, pf_bytes, pf2 if pf2 is not None else x, pf2_bytes, H=num_heads, HKV=hkv,
            D=D, ROT=rot, HALF=rot // 2, BH=BH, BD=triton.next_power_of_2(D), NORM_LO=lo, NORM_HI=hi,
            PF_PARTS=parts, PF_LANES=32 * warps, **l2_prefetch.constexprs(), num_warps=warps,
            **pdl.launch_kwargs(qk.device, early=True))
    return qk
