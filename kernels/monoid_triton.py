"""Triton kernels for the Spartacus monoid recurrence (GLA with per-key-dim decay).

Same functions and contract as `kernels/monoid.py`:
    S_t = diag(α_t) S_{t−1} + k_t v_tᵀ,   o_t = q_tᵀ S_t   (inclusive readout, q pre-scaled)
State rows are key dims, columns value dims. Value columns evolve independently, so each program owns
a [dk, BV] column tile of one head's state: it reads the tile once, keeps it in registers, and writes it
back once. Decode is therefore bound by the state traffic (2 × 4·dk·dv bytes per head).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

# From the sweeps in bench/kernels.py (H100, H 32, d 64; bench/results/kernels-h100.json).
DECODE_BV = 64
DECODE_WARPS = 2
PREFILL_BT = 16      # the [BT, BT, dk] intra-chunk tensor must stay in registers
# Prefill recomputes the intra-chunk scores in every dv block, so narrow blocks only pay while the grid
# is too small to fill the GPU: T=4096 in one sequence ran 1.58 ms at (BV 16, 8 warps) vs 2.39 ms at
# (32, 4); 8×512 tokens ran 0.78 ms at (32, 4) vs 1.60 ms at (16, 8) (H100).
PREFILL_SMALL_GRID = (16, 8)   # (BV, num_warps) when N·H·dv/32 < 2 × SMs
PREFILL_LARGE_GRID = (32, 4)


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, la_ptr, s_ptr, slot_ptr, o_ptr,
                   sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sa_b, sa_h, so_b, so_h,
                   H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    rk = tl.arange(0, BK)
    rv = tl.program_id(2) * BV + tl.arange(0, BV)
    mk = rk < DK
    mv = rv < DV
    slot = tl.load(slot_ptr + b).to(tl.int64)

    q = tl.load(q_ptr + b * sq_b + h * sq_h + rk, mask=mk, other=0.).to(tl.float32)
    k = tl.load(k_ptr + b * sk_b + h * sk_h + rk, mask=mk, other=0.).to(tl.float32)
    la = tl.load(la_ptr + b * sa_b + h * sa_h + rk, mask=mk, other=0.).to(tl.float32)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + rv, mask=mv, other=0.).to(tl.float32)

    s_off = ((slot * H + h) * DK + rk[:, None]) * DV + rv[None, :]
    ms = mk[:, None] & mv[None, :]
    S = tl.load(s_ptr + s_off, mask=ms, other=0.)
    S = S * tl.exp(la)[:, None] + k[:, None] * v[None, :]
    o = tl.sum(S * q[:, None], axis=0)
    tl.store(s_ptr + s_off, S, mask=ms)
    tl.store(o_ptr + b * so_b + h * so_h + rv, o.to(o_ptr.dtype.element_ty), mask=mv)


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, la_ptr, s_ptr, slot_ptr, cu_ptr, o_ptr,
                    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sa_t, sa_h, so_t, so_h,
                    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
    """Chunked scan: per chunk of BT tokens, inter-chunk term through the carried state (one matmul),
    intra-chunk term as a masked BT×BT decay-weighted score matrix, then one matmul to advance the state.
    Chunks of one sequence run in order inside the program, so parallelism is N·H·(dv/BV) programs.

    Decay ratios are always formed as exp(b_t − b_s) with t ≥ s (exponent ≤ 0), so no factor can
    overflow however fast a gate decays.
    """
    n = tl.program_id(0)
    h = tl.program_id(1)
    rk = tl.arange(0, BK)
    rv = tl.program_id(2) * BV + tl.arange(0, BV)
    rt = tl.arange(0, BT)
    mk = rk < DK
    mv = rv < DV
    slot = tl.load(slot_ptr + n).to(tl.int64)
    bos = tl.load(cu_ptr + n)
    eos = tl.load(cu_ptr + n + 1)

    s_off = ((slot * H + h) * DK + rk[:, None]) * DV + rv[None, :]
    ms = mk[:, None] & mv[None, :]
    S = tl.load(s_ptr + s_off, mask=ms, other=0.)
    causal = rt[:, None] >= rt[None, :]

    for t0 in range(bos, eos, BT):
        tok = (t0 + rt).to(tl.int64)
        mt = tok < eos
        mtk = mt[:, None] & mk[None, :]
        mtv = mt[:, None] & mv[None, :]
        q = tl.load(q_ptr + tok[:, None] * sq_t + h * sq_h + rk[None, :], mask=mtk, other=0.).to(tl.float32)
        k = tl.load(k_ptr + tok[:, None] * sk_t + h * sk_h + rk[None, :], mask=mtk, other=0.).to(tl.float32)
        la = tl.load(la_ptr + tok[:, None] * sa_t + h * sa_h + rk[None, :], mask=mtk, other=0.).to(tl.float32)
        v = tl.load(v_ptr + tok[:, None] * sv_t + h * sv_h + rv[None, :], mask=mtv, other=0.).to(tl.float32)
        b = tl.cumsum(la, axis=0)  # inclusive log-decay from the chunk start; padded rows add 0

        o = tl.dot(q * tl.exp(b), S, input_precision="ieee")
        # Intra-chunk scores with the exact pairwise decay, as one [BT, BT, BK] broadcast: no row
        # extraction or per-column loop, which cost ~2.5x more on H100 (bench/results/kernels-h100.json).
        w = tl.exp(tl.minimum(b[:, None, :] - b[None, :, :], 0.))
        A = tl.sum(q[:, None, :] * k[None, :, :] * w, axis=2)
        A = tl.where(causal, A, 0.)
        o += tl.dot(A, v, input_precision="ieee")
        tl.store(o_ptr + tok[:, None] * so_t + h * so_h + rv[None, :], o.to(o_ptr.dtype.element_ty), mask=mtv)

        b_last = tl.sum(tl.where((rt == BT - 1)[:, None], b, 0.), axis=0)
        kd = k * tl.exp(b_last[None, :] - b)
        S = S * tl.exp(b_last)[:, None] + tl.dot(tl.trans(kd), v, input_precision="ieee")

    tl.store(s_ptr + s_off, S, mask=ms)


def _check_pool(state_pool: torch.Tensor, H: int, dk: int, dv: int) -> None:
    assert state_pool.dtype == torch.float32 and state_pool.is_contiguous(), "state pool: contiguous fp32"
    assert tuple(state_pool.shape[1:]) == (H, dk, dv), f"state pool {tuple(state_pool.shape)} vs {(H, dk, dv)}"


def _last_contig(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def decode_launch(q, k, v, log_a, state_pool, slot_ids, BV: int, num_warps: int) -> torch.Tensor:
    """decode_step with an explicit tile config (the benchmark sweeps it)."""
    q, k, v, log_a = _last_contig(q, k, v, log_a)
    B, H, dk = q.shape
    dv = v.shape[-1]
    _check_pool(state_pool, H, dk, dv)
    o = torch.empty(B, H, dv, dtype=q.dtype, device=q.device)
    BV = min(BV, triton.next_power_of_2(dv))
    grid = (B, H, triton.cdiv(dv, BV))
    _decode_kernel[grid](q, k, v, log_a, state_pool, slot_ids, o,
                         q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                         log_a.stride(0), log_a.stride(1), o.stride(0), o.stride(1),
                         H=H, DK=dk, DV=dv, BK=triton.next_power_of_2(dk), BV=BV, num_warps=num_warps)
    return o


def decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_a: torch.Tensor,
                state_pool: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """One token per row: q, k, log_a [B, H, dk], v [B, H, dv]; updates state_pool[slot_ids] in place.

    CUDA-graph safe: no host syncs; the grid depends on shapes only.
    """
    return decode_launch(q, k, v, log_a, state_pool, slot_ids, DECODE_BV, DECODE_WARPS)


def prefill_launch(q, k, v, log_a, cu_seqlens, state_pool, slot_ids, BT: int, BV: int,
                   num_warps: int) -> torch.Tensor:
    """varlen_prefill with an explicit tile config (the benchmark sweeps it)."""
    q, k, v, log_a = _last_contig(q, k, v, log_a)
    T, H, dk = q.shape
    dv = v.shape[-1]
    _check_pool(state_pool, H, dk, dv)
    N = slot_ids.shape[0]
    o = torch.empty(T, H, dv, dtype=q.dtype, device=q.device)
    BK = max(16, triton.next_power_of_2(dk))      # tl.dot needs every dim >= 16
    BV = max(16, min(BV, triton.next_power_of_2(dv)))
    grid = (N, H, triton.cdiv(dv, BV))
    _prefill_kernel[grid](q, k, v, log_a, state_pool, slot_ids, cu_seqlens, o,
                          q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                          log_a.stride(0), log_a.stride(1), o.stride(0), o.stride(1),
                          H=H, DK=dk, DV=dv, BK=BK, BV=BV, BT=BT, num_warps=num_warps)
    return o


@lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def varlen_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_a: torch.Tensor,
                   cu_seqlens: torch.Tensor, state_pool: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """Packed tokens [T, H, ·]; sequence n spans cu_seqlens[n]:cu_seqlens[n+1], starts from
    state_pool[slot_ids[n]] and writes its final state back there. Tile choice uses shapes only."""
    wide = slot_ids.shape[0] * q.shape[1] * triton.cdiv(v.shape[-1], 32) >= 2 * _sm_count(q.device)
    BV, warps = PREFILL_LARGE_GRID if wide else PREFILL_SMALL_GRID
    return prefill_launch(q, k, v, log_a, cu_seqlens, state_pool, slot_ids, PREFILL_BT, BV, warps)
