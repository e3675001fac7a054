"""Triton versions of kernels/sampling.py. A row of a 49k–128k vocabulary is one long reduction, which
PyTorch runs in one block per row (~25 µs for a 128k argmax on an H100, ~35 µs a softmax); here each row is
split over many programs (stage 1: a block's best key and its index), then one small program per row picks
the best block (stage 2). Ties keep the lowest index, as torch.argmax. CUDA-graph safe: the race's seed is
read from device memory."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridserve.kernels import pdl

BLOCK = 4096
# argmax / race on PDL: the first stage launches during the LM head's tail (an A/B knob)
SELECT_PDL = True


@triton.jit
def _block_best_kernel(x_ptr, scale_ptr, seed_ptr, floor_ptr, val_ptr, idx_ptr, V, sx, NB, BLOCK: tl.constexpr,
                       RACE: tl.constexpr, FLOOR: tl.constexpr, PDL: tl.constexpr):
    if PDL:   # kernels/pdl.py: the logits come from the kernel before
        pdl.enter(PDL)
    row = tl.program_id(0)
    blk = tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    m = cols < V
    key = tl.load(x_ptr + row.to(tl.int64) * sx + cols, mask=m, other=float("-inf")).to(tl.float32)
    if RACE:
        seed = tl.load(seed_ptr)
        u = tl.maximum(tl.rand(seed, row * V + cols), 1.1754944e-38)
        scaled = key * tl.load(scale_ptr + row)
        key = scaled - tl.log(-tl.log(u))
        if FLOOR:
            m = m & (scaled >= tl.load(floor_ptr + row))
        key = tl.where(m, key, float("-inf"))
    best = tl.max(key, axis=0)
    first = tl.min(tl.where(key == best, cols, V), axis=0)      # lowest index among the block's maxima
    tl.store(val_ptr + row * NB + blk, best)
    tl.store(idx_ptr + row * NB + blk, first)


@triton.jit
def _row_best_kernel(val_ptr, idx_ptr, out_ptr, NB, BNB: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        pdl.enter(PDL)
    row = tl.program_id(0)
    b = tl.arange(0, BNB)
    m = b < NB
    val = tl.load(val_ptr + row * NB + b, mask=m, other=float("-inf"))
    idx = tl.load(idx_ptr + row * NB + b, mask=m, other=2147483647)
    best = tl.max(val, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(val == best, idx, 2147483647), axis=0).to(tl.int64))


def _best(logits: torch.Tensor, scale: torch.Tensor | None, seed: torch.Tensor | None,
          floor: torch.Tensor | None = None) -> torch.Tensor:
    B, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    nb = triton.cdiv(V, BLOCK)
    val = torch.empty(B, nb, dtype=torch.float32, device=logits.device)
    idx = torch.empty(B, nb, dtype=torch.int32, device=logits.device)
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    if B:
        race = scale is not None
        launch = pdl.launch_kwargs(logits.device) if SELECT_PDL else {"PDL": False}
        _block_best_kernel[(B, nb)](logits, scale if race else logits, seed if race else logits,
                                    floor if floor is not None else logits, val, idx, V, logits.stride(0), nb,
                                    BLOCK=BLOCK, RACE=race, FLOOR=floor is not None, num_warps=8,
                                    **launch)
        _row_best_kernel[(B,)](val, idx, out, nb, BNB=max(16, triton.next_power_of_2(nb)), num_warps=1, **launch)
    return out


def argmax(logits: torch.Tensor) -> torch.Tensor:
    return _best(logits, None, None)


def race(logits: torch.Tensor, scale: torch.Tensor, seed: torch.Tensor,
         floor: torch.Tensor | None = None) -> torch.Tensor:
    return _best(logits, scale.float().contiguous(), seed, None if floor is None else floor.float().contiguous())


# -- truncation_floor without a sort ---------------------------------------------------------------------
# The floor is a threshold search on each row. Every fp32 value maps to an int32 key of the same order
# (_key); the top_k cut is the smallest key c with count(x > c) < k, the top_p cut the smallest key c with
# mass(x > c) < top_p · Z over the tokens min_p and top_k keep (mass exp(x − max), Z their total). Both
# conditions are monotone in c, so a search keeps a key range (lo, hi] with the condition false at lo and
# true at hi, and narrows it SEARCH_C-fold per pass: each pass's programs (SEARCH_BLOCK elements of a row
# each) sum count or mass above SEARCH_C candidate keys inside the range; the next pass's programs add the
# partial sums up and keep the sub-range where the condition turns true. 2^32 keys → 32 / log2 C passes,
# then hi is the cut, exactly (a token value). Each pass reads the row once (from L2 at these sizes).
# Tiles from bench/sampler_cost.py --search-sweep (H100, bench/results/sampler_search_sweep-h100.json, graph
# µs for top_p at 128k × 1 / × 32): 1024-element programs for a few rows (46.8 vs 103 at 4096), 4096 for
# many (180 vs 216); 16 candidates (8 passes); 4 warps (8: 1.3-3× slower). The sort: 156 / 730.
SEARCH_BLOCK = None        # None: 1024 up to SEARCH_FEW_ROWS rows, else 4096
SEARCH_FEW_ROWS = 8
SEARCH_SUB = 128
SEARCH_WARPS = 4
SEARCH_C = 16              # candidates per pass: 2^32 keys take ceil(32 / log2 C) passes (8)


@triton.jit
def _key(x):
    """fp32 → int32 key, ordered as the values under a signed compare (−0 just below +0; no value maps to
    −2^31, so it stands for "below every value")."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _unkey(k):
    k = k.to(tl.int32)
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _candidates(lo, hi, ci, C: tl.constexpr):
    """The C keys a pass tests in (lo, hi]: lo itself, then lo + ceil((hi − lo)·i / C)."""
    return lo + ((hi - lo) * ci + C - 1) // C


@triton.jit
def _row_stats_kernel(x_ptr, bmax_ptr, bmin_ptr, V, sx, NB, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    blk = tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    m = cols < V
    x = tl.load(x_ptr + row.to(tl.int64) * sx + cols, mask=m, other=float("-inf"))
    tl.store(bmax_ptr + row * NB + blk, tl.max(x, axis=0))
    tl.store(bmin_ptr + row * NB + blk, tl.min(tl.where(m, x, float("inf")), axis=0))


@triton.jit
def _search_kernel(x_ptr, bmax_ptr, bmin_ptr, minp_ptr, knob_ptr, kth_ptr, part_in, part_out, st_in, st_out,
                   tg_in, tg_out, floor_ptr, V, sx, NB, step, BLOCK: tl.constexpr, SUB: tl.constexpr, C: tl.constexpr,
                   BNB: tl.constexpr, MASS: tl.constexpr, HAS_K: tl.constexpr, BODY: tl.constexpr):
    """One pass of a search (module comment). MASS: the top_p cut (knob_ptr: top_p), else the top_k cut
    (knob_ptr: k). step 0 starts the range; later steps first narrow it from the previous pass's sums. The
    range (st: int64 lo, hi) and the target (tg) of each row pass from step to step through its program 0."""
    row = tl.program_id(0)
    blk = tl.program_id(1)
    b = tl.arange(0, BNB)
    mb = b < NB
    top = tl.max(tl.load(bmax_ptr + row * NB + b, mask=mb, other=float("-inf")), axis=0)
    floor1 = top
    if MASS:
        floor1 = top + tl.log(tl.load(minp_ptr + row))
        if HAS_K:
            floor1 = tl.maximum(floor1, tl.load(kth_ptr + row))
        lo0 = _key(floor1).to(tl.int64) - 1          # every kept token lies above: A(lo0) = Z
    else:
        bottom = tl.min(tl.load(bmin_ptr + row * NB + b, mask=mb, other=float("inf")), axis=0)
        lo0 = _key(bottom).to(tl.int64) - 1
    lo0 = tl.maximum(lo0, -2147483648)
    ci = tl.arange(0, C)
    if step == 0:
        lo = lo0
        hi = _key(top).to(tl.int64)                  # nothing lies above the top: the condition holds
        target = tl.load(knob_ptr + row).to(tl.float32)     # top_p (times Z once known) or k
        if MASS:
            target = tl.where(target >= 1.0, float("inf"), target)   # top_p 1 cuts nothing
    else:
        lo = tl.load(st_in + row * 2)
        hi = tl.load(st_in + row * 2 + 1)
        target = tl.load(tg_in + row)
        parts = tl.load(part_in + (row * NB + b[:, None]) * C + ci[None, :], mask=mb[:, None], other=0.0)
        tot = tl.sum(parts, axis=0)
        if MASS:
            if step == 1:                            # candidate 0 was lo0: its sum is Z
                target = target * tl.sum(tl.where(ci == 0, tot, 0.0), axis=0)
        cand = _candidates(lo, hi, ci, C)
        cond = (tot < target) & (ci > 0)             # candidate 0 is lo, false by construction
        new_hi = tl.min(tl.where(cond, cand, hi), axis=0)
        lo = tl.max(tl.where(cond, lo, cand), axis=0)
        hi = new_hi
    if blk == 0:
        tl.store(st_out + row * 2, lo)
        tl.store(st_out + row * 2 + 1, hi)
        tl.store(tg_out + row, target)
        if MASS:
            tl.store(floor_ptr + row, tl.maximum(floor1, _unkey(hi)))
        else:
            tl.store(floor_ptr + row, _unkey(hi))
    if BODY:
        cand = _candidates(lo, hi, ci, C).to(tl.int32)
        acc = tl.zeros((SUB, C), dtype=tl.float32)      # reduced once, after the loop
        for s in range(0, BLOCK, SUB):
            cols = blk * BLOCK + s + tl.arange(0, SUB)
            m = cols < V
            x = tl.load(x_ptr + row.to(tl.int64) * sx + cols, mask=m, other=float("-inf"))
            if MASS:
                w = tl.where(m & (x >= floor1), tl.exp(x - top), 0.0)
            else:
                w = tl.where(m, 1.0, 0.0)
            k = _key(x)
            acc += tl.where(k[:, None] > cand[None, :], w[:, None], 0.0)
        tl.store(part_out + (row * NB + blk) * C + ci, tl.sum(acc, axis=0))


def _search(x, bmax, bmin, min_p, knob, kth, out, block: int, mass: bool, has_k: bool) -> None:
    B, V = x.shape
    nb = bmax.shape[1]
    parts = torch.empty(2, B, nb, SEARCH_C, dtype=torch.float32, device=x.device)
    st = torch.empty(2, 2 * B, dtype=torch.int64, device=x.device)    # lo, hi per row
    tg = torch.empty(2, B, dtype=torch.float32, device=x.device)
    passes = -(-32 // (SEARCH_C.bit_length() - 1))
    for step in range(passes + 1):
        body = step < passes
        i, o = (step + 1) % 2, step % 2
        _search_kernel[(B, nb if body else 1)](
            x, bmax, bmin, min_p, knob, kth if kth is not None else bmax, parts[i], parts[o], st[i], st[o],
            tg[i], tg[o], out,
            V, x.stride(0), nb, step, BLOCK=block, SUB=SEARCH_SUB, C=SEARCH_C,
            BNB=max(16, triton.next_power_of_2(nb)), MASS=mass, HAS_K=has_k, BODY=body, num_warps=SEARCH_WARPS)


def truncation_floor(x: torch.Tensor, min_p: torch.Tensor, top_k: torch.Tensor | None,
                     top_p: torch.Tensor) -> torch.Tensor:
    """kernels/sampling.py's truncation_floor without a sort: 2 × 8 small launches (half without top_k), each
    reading the row once. Same floor up to rounding of the mass sums at the top_p cut."""
    B, V = x.shape
    x = x.float().contiguous()
    block = SEARCH_BLOCK or (1024 if B <= SEARCH_FEW_ROWS else 4096)
    nb = triton.cdiv(V, block)
    bmax = torch.empty(B, nb, dtype=torch.float32, device=x.device)
    bmin = torch.empty_like(bmax)
    floor = torch.empty(B, dtype=torch.float32, device=x.device)
    if B == 0:
        return floor
    _row_stats_kernel[(B, nb)](x, bmax, bmin, V, x.stride(0), nb, BLOCK=block, num_warps=8)
    kth = None
    if top_k is not None:
        kth = torch.empty(B, dtype=torch.float32, device=x.device)
        _search(x, bmax, bmin, min_p, top_k, kth, kth, block, mass=False, has_k=False)
    _search(x, bmax, bmin, min_p.float().contiguous(), top_p.float().contiguous(), kth, floor, block, mass=True,
            has_k=kth is not None)
    return floor
