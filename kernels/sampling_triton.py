"""Triton versions of kernels/sampling.py. A row of a 49k–128k vocabulary is one long reduction, which
PyTorch runs in one block per row (~25 µs for a 128k argmax on an H100, ~35 µs a softmax); here each row is
split over many programs (stage 1: a block's best key and its index), then one small program per row picks
the best block (stage 2). Ties keep the lowest index, as torch.argmax. CUDA-graph safe: the race's seed is
read from device memory. The race's noise takes four uniforms from each philox call and the hardware's
approximate log where its error cannot matter (_gumbel). A truncated draw (`race_truncated`) races first and
searches for the top_p floor only in the rows whose winner the cut refuses (bottom of the file).

H100 (bench/sampler_cost.py --draws-against, bench/results/sampler_draws_against-h100.json), the sampler
graphs' whole draw at 151,665 × 128, temperature alone / top_p 0.95 / top_k 50 + top_p: 62-64 / 214-234 /
494-616 µs, against 127-129 / 466-777 / 725-852 with one philox call an element, accurate logs and the floor
searched in every row first."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hybridserve.kernels import pdl

BLOCK = 4096
# argmax / race on PDL: the first stage launches during the LM head's tail (an A/B knob)
SELECT_PDL = True


def _fast() -> bool:
    """Compiled kernels use the hardware's approximate log (inline PTX); the interpreter cannot run PTX."""
    return os.environ.get("TRITON_INTERPRET") != "1"


def _bnb(n: int) -> int:
    """The tile width a program reads a row's n per-block entries with."""
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _ln(x, FAST: tl.constexpr):
    """Natural log: compiled, the hardware's approximate log2 (one MUFU op; absolute error ~2^-22 in log2,
    against libdevice's ~20-instruction logf); under the interpreter, tl.log."""
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1) * 0.6931471805599453
    else:
        return tl.log(x)


@triton.jit
def _gumbel(u0, u1, u2, u3, j: tl.constexpr, FAST: tl.constexpr):
    """−log(E), E ~ Exp(1), from quarter j's uniform v in [0, 1) (philox, steps of 2^-31 near 0). E = −log(1 − v):
    the small E that decide a race come from small v, where a series gives them to full precision (the
    approximate log of 1 − v only from v = 2^-7 on, where its error is ≤ ~1e-5 of E); E ≥ 2^-33 (v = 0). The
    outer log's error, ~1e-7 absolute on a key, moves a race only between keys that close."""
    if j == 0:
        v = u0
    elif j == 1:
        v = u1
    elif j == 2:
        v = u2
    else:
        v = u3
    series = v + v * v * (0.5 + v * (0.3333333333333333 + v * 0.25))
    e = tl.where(v < 0.0078125, series, -_ln(1.0 - v, FAST))
    return -_ln(tl.maximum(e, 1.1641532e-10), FAST)


@triton.jit
def _zero_counters(cnt_ptr, row, NCNT):
    """The row's NCNT search counters (cnt[i, row], rows = the grid's first axis) to 0."""
    for i in range(NCNT):
        tl.store(cnt_ptr + i * tl.num_programs(0) + row, 0)


@triton.jit
def _row_winner(val_ptr, idx_ptr, row, NB, BNB: tl.constexpr):
    """The row's best from its NB block bests: the lowest index among the best keys (torch.argmax's rule)."""
    b = tl.arange(0, BNB)
    m = b < NB
    val = tl.load(val_ptr + row * NB + b, mask=m, other=float("-inf"))
    idx = tl.load(idx_ptr + row * NB + b, mask=m, other=2147483647)
    return tl.min(tl.where(val == tl.max(val, axis=0), idx, 2147483647), axis=0)


@triton.jit
def _block_best_kernel(x_ptr, scale_ptr, seed_ptr, floor_ptr, val_ptr, idx_ptr, bmax_ptr, bmin_ptr, cnt_ptr, V, sx,
                       NB, NCNT, noise0, BLOCK: tl.constexpr, RACE: tl.constexpr, FLOOR: tl.constexpr,
                       STATS: tl.constexpr, SKIP: tl.constexpr, FAST: tl.constexpr, PDL: tl.constexpr):
    """A block's best key and its lowest index: the raw value (argmax) or, RACE, the value times the row's
    scale plus Gumbel noise (−log E, E ~ Exp(1), _gumbel); FLOOR: scaled values under the row's floor are out,
    and SKIP: a row whose floor is +inf has its token already and is left alone. The block is read as four
    quarters, each element's uniform one of the four outputs of one philox call (at noise0 + the quarter's
    position), so the noise costs a quarter of a call an element. FAST: _gumbel's hardware log. STATS: also
    the block's max and least finite scaled value (the truncation search's row stats, as _row_stats_kernel),
    and block 0 zeroes the row's NCNT search counters."""
    if PDL:   # kernels/pdl.py: the logits come from the kernel before
        pdl.enter(PDL)
    row = tl.program_id(0)
    blk = tl.program_id(1)
    if FLOOR:
        fl = tl.load(floor_ptr + row)
        if SKIP:
            if fl == float("inf"):
                return
    Q: tl.constexpr = BLOCK // 4
    i = tl.arange(0, Q)
    if RACE:
        sc = tl.load(scale_ptr + row)
        u0, u1, u2, u3 = tl.rand4x(tl.load(seed_ptr), noise0 + (row * NB + blk) * Q + i)
    for j in tl.static_range(4):
        cols = blk * BLOCK + j * Q + i
        m = cols < V
        key = tl.load(x_ptr + row.to(tl.int64) * sx + cols, mask=m, other=float("-inf")).to(tl.float32)
        if RACE:
            scaled = key * sc
            if STATS:
                fin = tl.where(m & (scaled > float("-inf")), scaled, float("inf"))
                if j == 0:
                    top, least = scaled, fin
                else:
                    top, least = tl.maximum(top, scaled), tl.minimum(least, fin)
            key = scaled + _gumbel(u0, u1, u2, u3, j, FAST)
            if FLOOR:
                m = m & (scaled >= fl)
            key = tl.where(m, key, float("-inf"))
        # each lane keeps its best key and the lowest column holding it (quarters in column order); one
        # block-wide reduction at the end
        if j == 0:
            bk, bc = key, cols
        else:
            up = key > bk
            bk, bc = tl.where(up, key, bk), tl.where(up, cols, bc)
    best = tl.max(bk, axis=0)
    first = tl.min(tl.where(bk == best, bc, V), axis=0)      # lowest index among the block's maxima
    tl.store(val_ptr + row * NB + blk, best)
    tl.store(idx_ptr + row * NB + blk, first)
    if STATS:
        tl.store(bmax_ptr + row * NB + blk, tl.max(top, axis=0))
        tl.store(bmin_ptr + row * NB + blk, tl.min(least, axis=0))
        if blk == 0:
            _zero_counters(cnt_ptr, row, NCNT)


@triton.jit
def _row_best_kernel(val_ptr, idx_ptr, out_ptr, floor_ptr, NB, BNB: tl.constexpr, SKIP: tl.constexpr,
                     PDL: tl.constexpr):
    if PDL:
        pdl.enter(PDL)
    row = tl.program_id(0)
    if SKIP:     # as in _block_best_kernel: the row has its token
        if tl.load(floor_ptr + row) == float("inf"):
            return
    tl.store(out_ptr + row, _row_winner(val_ptr, idx_ptr, row, NB, BNB).to(tl.int64))


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
        floor_arg = floor if floor is not None else logits
        _block_best_kernel[(B, nb)](logits, scale if race else logits, seed if race else logits, floor_arg, val, idx,
                                    val, val, idx, V, logits.stride(0), nb, 0, 0, BLOCK=BLOCK, RACE=race,
                                    FLOOR=floor is not None, STATS=False, SKIP=False, FAST=_fast(), num_warps=8,
                                    **launch)
        _row_best_kernel[(B,)](val, idx, out, floor_arg, nb, BNB=_bnb(nb), SKIP=False, num_warps=1, **launch)
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
# true at hi, and what lies above hi (`above`: its count or mass) known. A pass tests C candidate keys in the
# range: its programs (SEARCH_BLOCK elements of a row each) sum count or mass above each candidate over the
# elements inside the range only, and the next launch adds the partial sums up and keeps the sub-range where
# the condition turns true. Where both ends are finite values, the candidates are spread evenly in value,
# which narrows a range that spans many binades far faster than spreading them in key (the top_p search
# also starts no lower than top − R, see _row_setup). From the second pass on, tiles with no element in the
# range skip the C-wide sums and the range's elements are counted; a pass also copies them to the row's
# buffer (SEARCH_GATHER slots) when the last count says they should fit, and once they did, the row's later
# passes sum over its buffer instead of the whole row. One program per row then finishes the search on the
# buffer by key (C-fold a step, so at most 32 / log2 C steps) until hi is the cut exactly (a token value).
# A row whose range never fitted the buffer finishes on its whole row in that one program: right, but ~10×
# slower; no input measured did that with the defaults.
# Settings: bench/sampler_cost.py --search-sweep (H100, bench/results/sampler_search_sweep_adaptive-h100.json): over
# 151,665 and 49,152 tokens, 1 / 8 / 128 rows, logits N(0, 5²), N(0, 1) and N(0, 1) with every 100th token
# at −100, 16 candidates, 4 passes and 2,048 slots were never slower than the earlier form of eight whole-row
# passes, at 0.68 of its time (geometric mean) for top_p and 0.49 for top_k + top_p; 3 passes had rows that
# never fitted. 1024-element programs for a few rows, 4096 for many (an earlier sweep).
SEARCH_BLOCK = None        # None: 1024 up to SEARCH_FEW_ROWS rows, else 4096
SEARCH_FEW_ROWS = 8
SEARCH_SUB = 128
SEARCH_WARPS = 4
SEARCH_C = 16              # candidates per pass
SEARCH_PASSES = 4          # launches over the rows' blocks, then one finishing program per row
SEARCH_GATHER = 2048       # buffer slots per row
SEARCH_RATIO = 16          # a pass gathers where the last range held at most this many times the buffer
SEARCH_CHECK = 1024        # elements tested at once for any inside the range
FINISH_TILE = 1024         # the finishing program's loop step
ACCEPT_SEARCH_BLOCK = 1024  # race_truncated's top_p search, on the rows whose first draw was refused
# The top_k search's start from a bound: the k-th largest of the row's group maxima (groups of K_GROUP elements),
# distinct tokens, so at least k tokens lie at or above it. Its first pass then counts and gathers only the few
# tokens above the bound (skipping chunks with none, as later passes do) and the next passes read the buffer.
# 0: no bound (every row on the whole row for its first passes, as before). Only for more than K_BOUND_ROWS rows:
# at one to eight rows (1024-element blocks) its launch costs about what it saves.
K_GROUP = 256
K_BOUND_ROWS = SEARCH_FEW_ROWS
FINISH_WARPS = 4


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
def _candidates(lo, hi, ci, C: tl.constexpr, BY_VALUE: tl.constexpr):
    """The C keys a step tests, all in [lo, hi]: lo itself, then by key lo + ceil((hi − lo)·i / C) (C-fold
    narrowing, guaranteed), or (BY_VALUE, where unkey(lo) and unkey(hi) are finite) the keys of the values
    spread evenly between them. Any keys in [lo, hi] keep the search right; these only choose them well."""
    cand = lo + ((hi - lo) * ci + C - 1) // C
    if BY_VALUE:
        a = _unkey(lo)
        b = _unkey(hi)
        t = ci.to(tl.float32) / C
        # one explicit fma: a pass and the next one's narrowing compute these keys in different kernels' code,
        # and must get the same bits (a plain a·(1 − t) + b·t was contracted differently there on the GPU, so a
        # row's next range could miss the token the last pass had counted in it)
        kv = tl.minimum(tl.maximum(_key(tl.fma(b - a, t, a)).to(tl.int64), lo), hi)
        kv = tl.where(ci == 0, lo, kv)
        cand = tl.where((a > float("-inf")) & (b < float("inf")), kv, cand)    # NaN ends fail both
    return cand


@triton.jit
def _row_stats_kernel(x_ptr, bmax_ptr, bmin_ptr, cnt_ptr, scale_ptr, gmax_ptr, V, sx, NB, NCNT, BLOCK: tl.constexpr,
                      SCALED: tl.constexpr, GROUP: tl.constexpr = 0):
    """Per block of a row: its max and its least finite value (SCALED: of the values times the row's scale);
    GROUP > 0: also the max of each group of GROUP elements (−inf past the row's end); block 0 zeroes the
    row's NCNT counters."""
    row = tl.program_id(0)
    blk = tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    m = cols < V
    x = tl.load(x_ptr + row.to(tl.int64) * sx + cols, mask=m, other=float("-inf"))
    if SCALED:
        x = x * tl.load(scale_ptr + row)
    tl.store(bmax_ptr + row * NB + blk, tl.max(x, axis=0))
    if GROUP > 0:
        NG: tl.constexpr = BLOCK // GROUP
        tl.store(gmax_ptr + (row * NB + blk) * NG + tl.arange(0, NG), tl.max(tl.reshape(x, (NG, GROUP)), axis=1))
    tl.store(bmin_ptr + row * NB + blk, tl.min(tl.where(m & (x > float("-inf")), x, float("inf")), axis=0))
    if blk == 0:
        _zero_counters(cnt_ptr, row, NCNT)


@triton.jit
def _kth_bound_kernel(gmax_ptr, knob_ptr, lb_ptr, V, NG, BNG: tl.constexpr):
    """One program per row: the k-th largest of its NG group maxima (k = knob_ptr[row]), −inf where there are
    fewer groups than k or k keeps the whole row."""
    row = tl.program_id(0)
    g = tl.arange(0, BNG)
    v = tl.sort(tl.load(gmax_ptr + row * NG + g, mask=g < NG, other=float("-inf")), descending=True)
    k = tl.load(knob_ptr + row)
    lb = tl.max(tl.where(g == k - 1, v, float("-inf")), axis=0)
    tl.store(lb_ptr + row, tl.where((k <= NG) & (k < V), lb, float("-inf")))


@triton.jit
def _floor1(bmax_ptr, minp_ptr, kth_ptr, row, NB, BNB: tl.constexpr, MASS: tl.constexpr, HAS_K: tl.constexpr):
    """The row's top value, and the floor min_p sets (HAS_K: and the top_k cut); without MASS, the top."""
    b = tl.arange(0, BNB)
    top = tl.max(tl.load(bmax_ptr + row * NB + b, mask=b < NB, other=float("-inf")), axis=0)
    floor1 = top
    if MASS:
        floor1 = top + tl.log(tl.load(minp_ptr + row))
        if HAS_K:
            floor1 = tl.maximum(floor1, tl.load(kth_ptr + row))
    return top, floor1


@triton.jit
def _row_setup(bmax_ptr, bmin_ptr, minp_ptr, kth_ptr, knob_ptr, row, V, NB, BNB: tl.constexpr,
               MASS: tl.constexpr, HAS_K: tl.constexpr, RAISE: tl.constexpr, lb_ptr=0, LB: tl.constexpr = False):
    """The row's top value, the floor min_p (and the top_k cut) set, and the search's first lo: just below
    the least finite value not under that floor (banned −inf tokens weigh nothing; when a row has none left,
    lo sits just under the top). RAISE, for top_p < 1: not below top − R either, R = log(V / (1 − top_p)) + 1:
    the tokens under it weigh less than V·e^−R < (1 − top_p)·Z in all (Z ≥ 1, the top's own weight), so the
    condition is false there (Z itself is then summed apart, TOTAL). LB (the top_k search): not below the
    row's bound at lb_ptr either (_kth_bound_kernel; at least k tokens lie at or above it)."""
    b = tl.arange(0, BNB)
    top, floor1 = _floor1(bmax_ptr, minp_ptr, kth_ptr, row, NB, BNB, MASS, HAS_K)
    least = tl.min(tl.load(bmin_ptr + row * NB + b, mask=b < NB, other=float("inf")), axis=0)
    start = least
    if MASS:
        start = tl.maximum(floor1, least)
        if RAISE:
            p = tl.load(knob_ptr + row).to(tl.float32)
            r = tl.log(V * 1.0) - tl.log(1.0 - p) + 1.0
            start = tl.where(p < 1.0, tl.maximum(start, top - r), start)
    elif LB:
        start = tl.maximum(start, tl.load(lb_ptr + row))
    hi0 = _key(top).to(tl.int64)
    lo0 = tl.where(start <= top, _key(start).to(tl.int64) - 1, hi0 - 1)
    return top, floor1, tl.maximum(lo0, -2147483648), hi0


@triton.jit
def _narrow(lo, hi, above, target, tot, cand, C: tl.constexpr):
    """Keep the sub-range where the condition (count or mass above < target) turns true; `above` follows hi."""
    ci = tl.arange(0, C)
    # candidate 0 is lo, false by construction; a range one key wide is final, and its pass summed nothing
    cond = (tot < target) & (ci > 0) & (hi - lo > 1)
    new_hi = tl.min(tl.where(cond, cand, hi), axis=0)
    new_above = tl.max(tl.where(cond, tot, above), axis=0)     # the sums fall as the key rises
    new_lo = tl.max(tl.where(cond, lo, cand), axis=0)
    return new_lo, new_hi, new_above


@triton.jit
def _narrowed(st_in, ab_in, part_in, row, NB, BNB: tl.constexpr, C: tl.constexpr, MASS: tl.constexpr, after_first):
    """The row's state after the last pass (lo, hi, buffer count, above, target), narrowed by that pass's sums.
    MASS and after_first: that pass was step 0 of a top_p search, whose candidate 0 summed Z: the target
    becomes top_p · Z."""
    ci = tl.arange(0, C)
    lo = tl.load(st_in + row * 3)
    hi = tl.load(st_in + row * 3 + 1)
    nbuf = tl.load(st_in + row * 3 + 2)
    above = tl.load(ab_in + row * 2)
    target = tl.load(ab_in + row * 2 + 1)
    b = tl.arange(0, BNB)
    parts = tl.load(part_in + (row * NB + b[:, None]) * C + ci[None, :], mask=(b < NB)[:, None], other=0.0)
    tot = above + tl.sum(parts, axis=0)
    if MASS:
        if after_first:
            target = target * tl.sum(tl.where(ci == 0, tot, 0.0), axis=0)
    lo, hi, above = _narrow(lo, hi, above, target, tot, _candidates(lo, hi, ci, C, True), C)
    return lo, hi, nbuf, above, target


@triton.jit
def _load_inside(ptr, cols, L, lo32, hi32, sc, SCALED: tl.constexpr):
    """ptr[cols] (< L; SCALED: times sc), their keys, the mask, and which lie inside the key range (lo, hi]."""
    m = cols < L
    x = tl.load(ptr + cols, mask=m, other=float("-inf"))
    if SCALED:
        x = x * sc
    k = _key(x)
    return x, k, m, m & (k > lo32) & (k <= hi32)


@triton.jit
def _tile_sums(ptr, L, lo32, hi32, cand32, top, floor1, acc, z, start, SUB: tl.constexpr, MASS: tl.constexpr,
               TOTAL: tl.constexpr, sc, SCALED: tl.constexpr):
    x, k, m, inside = _load_inside(ptr, start + tl.arange(0, SUB), L, lo32, hi32, sc, SCALED)
    if MASS:
        e = tl.exp(x - top)
        w = tl.where(inside, e, 0.0)
        if TOTAL:
            z += tl.where(m & (x >= floor1), e, 0.0)
    else:
        w = tl.where(inside, 1.0, 0.0)
    return acc + tl.where(k[:, None] > cand32[None, :], w[:, None], 0.0), z


@triton.jit
def _range_sums(ptr, L, lo, hi, cand, top, floor1, acc, z, start, BLOCK: tl.constexpr, SUB: tl.constexpr,
                CHECK: tl.constexpr, MASS: tl.constexpr, TOTAL: tl.constexpr, gather, buf_ptr, cnt_ptr, M, sc,
                SCALED: tl.constexpr):
    """acc[:, i] += the count or mass of the elements of ptr[start : start + BLOCK] (< L) with lo < key <= hi
    and key > cand[i], SUB elements at a time. CHECK > 0: first each CHECK elements are tested for any inside
    the range (one block-wide sum), the sums skip them where none is, and the row's counter at cnt_ptr counts
    those inside; where `gather`, they are also copied to buf_ptr (M slots; past M they are only counted).
    TOTAL (MASS, without CHECK): z += the mass of every element >= floor1, inside the range or not. SCALED:
    ptr holds raw logits, each multiplied by sc as loaded (the buffer holds scaled values)."""
    lo32 = lo.to(tl.int32)
    hi32 = hi.to(tl.int32)
    cand32 = cand.to(tl.int32)
    if CHECK == 0:
        for s in range(0, BLOCK, SUB):
            acc, z = _tile_sums(ptr, L, lo32, hi32, cand32, top, floor1, acc, z, start + s, SUB, MASS, TOTAL, sc,
                                SCALED)
    else:
        for c in range(0, BLOCK, CHECK):
            x, k, m, inside = _load_inside(ptr, start + c + tl.arange(0, CHECK), L, lo32, hi32, sc, SCALED)
            n = tl.sum(inside.to(tl.int32), axis=0)
            if n > 0:
                for s in range(0, CHECK, SUB):
                    acc, z = _tile_sums(ptr, L, lo32, hi32, cand32, top, floor1, acc, z, start + c + s, SUB, MASS,
                                        False, sc, SCALED)
                base = tl.atomic_add(cnt_ptr, n)
                if gather:
                    pos = base + tl.cumsum(inside.to(tl.int32), axis=0) - 1
                    tl.store(buf_ptr + pos, x, mask=inside & (pos < M))
    return acc, z


@triton.jit
def _settle(nbuf, cnt_ptr, B, row, q, M, RATIO: tl.constexpr):
    """A row still on its whole row (nbuf < 0) reads the gathered buffer from now on when pass q gathered (the
    count of pass q − 1's range was at most RATIO·M, so q's was expected to fit) and its range's count fit."""
    before = tl.load(cnt_ptr + (q - 1) * B + row)
    n = tl.load(cnt_ptr + q * B + row)
    return tl.where((nbuf < 0) & (before <= RATIO * M) & (n <= M), n, nbuf).to(tl.int64)


@triton.jit
def _settle_first(nbuf, cnt_ptr, lb_ptr, row, M):
    """A bounded row (LB) gathered its range at step 0: it reads the buffer from step 1 where the range fitted."""
    n = tl.load(cnt_ptr + row)
    return tl.where((nbuf < 0) & (tl.load(lb_ptr + row) > float("-inf")) & (n <= M), n, nbuf).to(tl.int64)


@triton.jit
def _accepted(part_ptr, xw_ptr, knob_ptr, row, floor1, NB, BNB: tl.constexpr):
    """Whether the row's first draw (value xw_ptr[row]) is a token the min_p / top_p cut keeps: not under
    floor1, and the mass above it (over tokens not under floor1) under top_p · Z, from _accept_sums_kernel's
    per-block sums. The search's own rule for its floor (module comment), so a kept draw is one at or above it."""
    b = tl.arange(0, BNB)
    mb = b < NB
    z = tl.sum(tl.load(part_ptr + (row * NB + b) * 2, mask=mb, other=0.0), axis=0)
    a = tl.sum(tl.load(part_ptr + (row * NB + b) * 2 + 1, mask=mb, other=0.0), axis=0)
    p = tl.load(knob_ptr + row)
    return (tl.load(xw_ptr + row) >= floor1) & ((p >= 1.0) | (a < p * z))


@triton.jit
def _accept_sums_kernel(x_ptr, scale_ptr, bmax_ptr, minp_ptr, kth_ptr, val_ptr, idx_ptr, part_ptr, xw_ptr, out_ptr,
                        V, sx, NB, BLOCK: tl.constexpr, BNB: tl.constexpr, HAS_K: tl.constexpr, PDL: tl.constexpr):
    """race_truncated's check of its first draw: each program finds the row's winner from the race's block
    bests (as _row_best_kernel), then sums over its block of the scaled row the mass exp(x − top) of the tokens
    not under floor1 = top + log(min_p) (HAS_K: nor under the top_k cut), in all (Z) and above the winner's
    value. Block 0 stores the winner as the row's token (a second draw replaces it where _accepted says no)
    and its value."""
    if PDL:
        pdl.enter(PDL)
    row = tl.program_id(0)
    blk = tl.program_id(1)
    base = x_ptr + row.to(tl.int64) * sx
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    m = cols < V
    sc = tl.load(scale_ptr + row)
    x = tl.load(base + cols, mask=m, other=float("-inf")) * sc     # in flight while the winner is found
    top, floor1 = _floor1(bmax_ptr, minp_ptr, kth_ptr, row, NB, BNB, True, HAS_K)
    w = tl.minimum(_row_winner(val_ptr, idx_ptr, row, NB, BNB), V - 1)
    xw = tl.load(base + w) * sc
    e = tl.where(m & (x >= floor1), tl.exp(x - top), 0.0)
    tl.store(part_ptr + (row * NB + blk) * 2, tl.sum(e, axis=0))
    tl.store(part_ptr + (row * NB + blk) * 2 + 1, tl.sum(tl.where(x > xw, e, 0.0), axis=0))
    if blk == 0:
        tl.store(out_ptr + row, w.to(tl.int64))
        tl.store(xw_ptr + row, xw)


@triton.jit
def _decide_kernel(bmax_ptr, minp_ptr, kth_ptr, knob_ptr, part_ptr, xw_ptr, floor_ptr, NB, BNB: tl.constexpr,
                   HAS_K: tl.constexpr):
    """One program per row: floor_ptr[row] = +inf where the first draw is kept (_accepted), else −inf until the
    search's finish stores the floor. The search's programs of a kept row leave at once."""
    row = tl.program_id(0)
    _, floor1 = _floor1(bmax_ptr, minp_ptr, kth_ptr, row, NB, BNB, True, HAS_K)
    keep = _accepted(part_ptr, xw_ptr, knob_ptr, row, floor1, NB, BNB)
    tl.store(floor_ptr + row, tl.where(keep, float("inf"), float("-inf")))


@triton.jit
def _search_kernel(x_ptr, bmax_ptr, bmin_ptr, minp_ptr, knob_ptr, kth_ptr, part_in, part_out, st_in, st_out,
                   ab_in, ab_out, buf_ptr, cnt_ptr, scale_ptr, flag_ptr, lb_ptr, B, V, sx, NB, NBS, M, step,
                   BLOCK: tl.constexpr, SUB: tl.constexpr, C: tl.constexpr, BNB: tl.constexpr, BNBS: tl.constexpr,
                   MASS: tl.constexpr, HAS_K: tl.constexpr, CHECK: tl.constexpr, FIRST: tl.constexpr,
                   TOTAL: tl.constexpr, RATIO: tl.constexpr, SCALED: tl.constexpr, ACCEPT: tl.constexpr,
                   LB: tl.constexpr):
    """One pass of a search (module comment). MASS: the top_p cut (knob_ptr: top_p), else the top_k cut
    (knob_ptr: k). step 0 starts the range; later steps first narrow it from the previous pass's sums. The
    range and the row's buffer count (st: int64 lo, hi, nbuf: −1 while on the whole row), what lies above hi
    and the target (ab) pass from step to step through each row's program 0. The pass's sums run over the
    row's block of the whole row, or of its buffer once the row reads that; cnt_ptr[step, row] counts the
    elements inside the range (step 0: V). A row whose range is one key wide is done: its later passes only
    carry its state on. SCALED: x_ptr holds raw logits, scaled by scale_ptr[row] as loaded. ACCEPT
    (race_truncated): a row whose flag_ptr[row] is +inf (its first draw kept, _decide_kernel) is left alone.
    LB (the top_k search, K_GROUP): step 0's range starts at the row's bound (lb_ptr); a row with one gathers
    its range into the buffer at step 0 already, counting it in cnt_ptr[0, row], and reads the buffer from
    step 1 where it fitted (_settle_first)."""
    row = tl.program_id(0)
    blk = tl.program_id(1)
    if ACCEPT:
        if tl.load(flag_ptr + row) == float("inf"):
            return
    if not FIRST:
        if tl.load(st_in + row * 3 + 1) - tl.load(st_in + row * 3) <= 1:
            if blk == 0:
                for f in range(3):
                    tl.store(st_out + row * 3 + f, tl.load(st_in + row * 3 + f))
                for f in range(2):
                    tl.store(ab_out + row * 2 + f, tl.load(ab_in + row * 2 + f))
            return
    ci = tl.arange(0, C)
    nbuf = tl.full((), -1, tl.int64)
    sc = 1.0
    if SCALED:
        sc = tl.load(scale_ptr + row)
    if FIRST:
        top, floor1, lo, hi = _row_setup(bmax_ptr, bmin_ptr, minp_ptr, kth_ptr, knob_ptr, row, V, NBS, BNBS, MASS,
                                         HAS_K, TOTAL, lb_ptr, LB)
        above = 0.0
        target = tl.load(knob_ptr + row).to(tl.float32)      # top_p (times Z once known) or k
        if MASS:
            done = target >= 1.0                             # top_p 1 cuts nothing
            target = tl.where(done, float("inf"), target)
        else:
            done = target >= V
        hi = tl.where(done, lo + 1, hi)
        if blk == 0:
            if not LB:     # LB: the pass counts its range itself
                tl.store(cnt_ptr + row, V)
        elif done:      # block 0 carries the state on; the later passes and the finish skip the row's sums
            return
    else:
        top, floor1 = _floor1(bmax_ptr, minp_ptr, kth_ptr, row, NBS, BNBS, MASS, HAS_K)
        lo, hi, nbuf, above, target = _narrowed(st_in, ab_in, part_in, row, NB, BNB, C, MASS, step == 1)
        if step >= 2:
            nbuf = _settle(nbuf, cnt_ptr, B, row, step - 1, M, RATIO)
        elif LB:
            nbuf = _settle_first(nbuf, cnt_ptr, lb_ptr, row, M)
    if blk == 0:
        tl.store(st_out + row * 3, lo)
        tl.store(st_out + row * 3 + 1, hi)
        tl.store(st_out + row * 3 + 2, nbuf)
        tl.store(ab_out + row * 2, above)
        tl.store(ab_out + row * 2 + 1, target)
    acc = tl.zeros((SUB, C), dtype=tl.float32)      # reduced once, after the loop
    z = tl.zeros((SUB,), dtype=tl.float32)
    cand = _candidates(lo, hi, ci, C, True)
    if hi - lo > 1:
        if nbuf >= 0:
            if blk * BLOCK < nbuf:
                acc, z = _range_sums(buf_ptr + row.to(tl.int64) * M, nbuf, lo, hi, cand, top, floor1, acc, z,
                                     blk * BLOCK, BLOCK, SUB, 0, MASS, False, False, buf_ptr, cnt_ptr, M, 1.0, False)
        else:
            gather = False
            if not FIRST:     # gather where the last range's count suggests this one fits the buffer
                gather = tl.load(cnt_ptr + (step - 1) * B + row) <= RATIO * M
            elif LB:          # or, at step 0, where the bound leaves few tokens in the range
                gather = tl.load(lb_ptr + row) > float("-inf")
            acc, z = _range_sums(x_ptr + row.to(tl.int64) * sx, V, lo, hi, cand, top, floor1, acc, z,
                                 blk * BLOCK, BLOCK, SUB, CHECK, MASS, TOTAL, gather,
                                 buf_ptr + row.to(tl.int64) * M, cnt_ptr + step * B + row, M, sc, SCALED)
    sums = tl.sum(acc, axis=0)
    if TOTAL:     # step 0's sum at candidate 0 is read as Z: with lo raised, the whole kept mass apart
        sums = tl.where(ci == 0, tl.sum(z, axis=0), sums)
    tl.store(part_out + (row * NB + blk) * C + ci, sums)


@triton.jit
def _finish_kernel(x_ptr, bmax_ptr, minp_ptr, kth_ptr, part_in, st_in, ab_in, buf_ptr, cnt_ptr,
                   floor_ptr, scale_ptr, lb_ptr, B, V, sx, NB, NBS, M, last, SUB: tl.constexpr, C: tl.constexpr,
                   BNB: tl.constexpr, BNBS: tl.constexpr, MASS: tl.constexpr, HAS_K: tl.constexpr,
                   ONE_PASS: tl.constexpr, RATIO: tl.constexpr, FINISH_TILE: tl.constexpr, SCALED: tl.constexpr,
                   ACCEPT: tl.constexpr, LB: tl.constexpr):
    """One program per row: narrow from the last pass's sums, then step by key over the row's buffer (or the
    whole row, where its range never fitted one) until hi is the cut; store the floor (ACCEPT: not for a row
    whose floor is already +inf, _decide_kernel)."""
    row = tl.program_id(0)
    if ACCEPT:
        if tl.load(floor_ptr + row) == float("inf"):
            return
    top, floor1 = _floor1(bmax_ptr, minp_ptr, kth_ptr, row, NBS, BNBS, MASS, HAS_K)
    sc = 1.0
    if SCALED:
        sc = tl.load(scale_ptr + row)
    ci = tl.arange(0, C)
    lo, hi, nbuf, above, target = _narrowed(st_in, ab_in, part_in, row, NB, BNB, C, MASS, ONE_PASS)
    if not ONE_PASS:
        nbuf = _settle(nbuf, cnt_ptr, B, row, last, M, RATIO)
    elif LB:
        nbuf = _settle_first(nbuf, cnt_ptr, lb_ptr, row, M)
    if nbuf >= 0:
        ptr = buf_ptr + row.to(tl.int64) * M
        L = nbuf.to(tl.int32)
    else:
        ptr = x_ptr + row.to(tl.int64) * sx
        L = V
    if SCALED:       # the buffer holds scaled values
        sc = tl.where(nbuf >= 0, 1.0, sc)
    while hi - lo > 1:
        cand = _candidates(lo, hi, ci, C, False)
        acc = tl.zeros((SUB, C), dtype=tl.float32)
        z = tl.zeros((SUB,), dtype=tl.float32)
        for s in range(0, L, FINISH_TILE):
            acc, z = _range_sums(ptr, L, lo, hi, cand, top, floor1, acc, z, s, FINISH_TILE, SUB, 0, MASS, False,
                                 False, buf_ptr, cnt_ptr, M, sc, SCALED)
        lo, hi, above = _narrow(lo, hi, above, target, above + tl.sum(acc, axis=0), cand, C)
    if MASS:
        tl.store(floor_ptr + row, tl.maximum(floor1, _unkey(hi)))
    else:
        tl.store(floor_ptr + row, _unkey(hi))


def _search(x, bmax, bmin, min_p, knob, kth, out, cnt, buf, block: int, mass: bool, has_k: bool,
            scale=None, accept: bool = False, lb=None) -> None:
    """One search's passes and finish into out [B]. scale: x holds raw logits, to scale per row as loaded.
    accept (race_truncated): rows whose out is +inf already (_decide_kernel) are left alone. lb (the top_k
    search): each row's bound (_kth_bound), or None."""
    B, V = x.shape
    nb = triton.cdiv(V, block)
    nbs = bmax.shape[1]        # the row stats' blocks (and accept's)
    M = buf.shape[1]
    parts = torch.empty(2, B, nb, SEARCH_C, dtype=torch.float32, device=x.device)
    st = torch.empty(2, 3 * B, dtype=torch.int64, device=x.device)     # lo, hi, buffer count per row
    ab = torch.empty(2, 2 * B, dtype=torch.float32, device=x.device)   # above hi, target per row
    kth = kth if kth is not None else bmax
    shape = dict(SUB=SEARCH_SUB, C=SEARCH_C, BNB=_bnb(nb), BNBS=_bnb(nbs), MASS=mass, HAS_K=has_k,
                 RATIO=SEARCH_RATIO, SCALED=scale is not None, ACCEPT=accept, LB=lb is not None)
    lb = lb if lb is not None else bmax
    scale = scale if scale is not None else bmax
    check = min(max(SEARCH_CHECK, SEARCH_SUB), block)
    for step in range(SEARCH_PASSES):
        i, o = (step + 1) % 2, step % 2
        # step 0's range holds most kept tokens (unless a bound starts it): nothing to skip there, and Z summed
        # whole (TOTAL)
        _search_kernel[(B, nb)](x, bmax, bmin, min_p, knob, kth, parts[i], parts[o], st[i], st[o], ab[i], ab[o],
                                buf, cnt, scale, out, lb, B, V, x.stride(0), nb, nbs, M, step, BLOCK=block,
                                CHECK=check if step or shape["LB"] else 0, FIRST=step == 0, TOTAL=mass and step == 0,
                                num_warps=SEARCH_WARPS, **shape)
    last = (SEARCH_PASSES - 1) % 2
    _finish_kernel[(B,)](x, bmax, min_p, kth, parts[last], st[last], ab[last], buf, cnt, out, scale, lb,
                         B, V, x.stride(0), nb, nbs, M, SEARCH_PASSES - 1, ONE_PASS=SEARCH_PASSES == 1,
                         FINISH_TILE=FINISH_TILE, num_warps=FINISH_WARPS, **shape)


def _search_state(B: int, V: int, device: torch.device):
    """A truncated draw's search buffers: (block, row stats' blocks nb, bmax, bmin [B, nb], the counters
    [2 searches, SEARCH_PASSES, B], the gather buffer [B, slots])."""
    block = SEARCH_BLOCK or (1024 if B <= SEARCH_FEW_ROWS else 4096)
    nb = triton.cdiv(V, block)
    bmax = torch.empty(B, nb, dtype=torch.float32, device=device)
    cnt = torch.empty(2, SEARCH_PASSES, B, dtype=torch.int32, device=device)
    buf = torch.empty(B, min(SEARCH_GATHER, V), dtype=torch.float32, device=device)
    return block, nb, bmax, torch.empty_like(bmax), cnt, buf


def _row_stats(x, scale, bmax, bmin, cnt, block: int, top_k) -> torch.Tensor | None:
    """_row_stats_kernel over x [B, V] (scale: per-row factors of raw logits, or None); with top_k (and
    K_GROUP), also the top_k search's bound per row (_kth_bound_kernel), returned; else None."""
    B, V = x.shape
    nb = bmax.shape[1]
    group = (K_GROUP if top_k is not None and B > K_BOUND_ROWS and 0 < K_GROUP <= block and block % K_GROUP == 0
             else 0)
    gmax = torch.empty(B, nb * (block // group), dtype=torch.float32, device=x.device) if group else bmax
    _row_stats_kernel[(B, nb)](x, bmax, bmin, cnt, scale if scale is not None else x, gmax, V, x.stride(0), nb,
                               cnt.numel() // B, BLOCK=block, SCALED=scale is not None, GROUP=group, num_warps=8)
    if not group:
        return None
    lb = torch.empty(B, dtype=torch.float32, device=x.device)
    ng = gmax.shape[1]
    _kth_bound_kernel[(B,)](gmax, top_k, lb, V, ng, BNG=triton.next_power_of_2(ng), num_warps=4)
    return lb


def truncation_floor(x: torch.Tensor, min_p: torch.Tensor, top_k: torch.Tensor | None,
                     top_p: torch.Tensor) -> torch.Tensor:
    """kernels/sampling.py's truncation_floor without a sort: per search SEARCH_PASSES launches over the rows'
    blocks and one finishing program per row (two searches with top_k). Same floor up to rounding of the mass
    sums at the top_p cut."""
    B, V = x.shape
    x = x.float().contiguous()
    floor = torch.empty(B, dtype=torch.float32, device=x.device)
    if B == 0:
        return floor
    block, nb, bmax, bmin, cnt, buf = _search_state(B, V, x.device)
    lb = _row_stats(x, None, bmax, bmin, cnt, block, top_k)
    kth = None
    if top_k is not None:
        kth = torch.empty(B, dtype=torch.float32, device=x.device)
        _search(x, bmax, bmin, min_p, top_k, kth, kth, cnt[0], buf, block, mass=False, has_k=False, lb=lb)
    _search(x, bmax, bmin, min_p.float().contiguous(), top_p.float().contiguous(), kth, floor, cnt[1], buf,
            block, mass=True, has_k=kth is not None)
    return floor


def race_truncated(logits: torch.Tensor, scale: torch.Tensor, min_p: torch.Tensor, top_k: torch.Tensor | None,
                   top_p: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """kernels/sampling.py's race_truncated by acceptance. A first race over the scaled row (with top_k: over
    the tokens its cut keeps, after that search; without: over the whole row, fused with the search's row
    stats), then one pass that sums the mass above the winner. Where the cut keeps the winner (_accepted; the
    chance is the kept share of the raced mass, at least top_p), it is the token: a draw from a superset that
    lands in the kept set is a draw from the kept set. Only the other rows search for the top_p floor and race
    again with fresh noise, so P(token = i) = π_i + (1 − P(kept))·π_i / P(kept) = π_i / P(kept) for kept i. The
    same law as the floor then the race, up to rounding at the top_p cut; no scaled copy of the logits."""
    B, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    scale = scale.float().contiguous()
    dev = logits.device
    out = torch.empty(B, dtype=torch.long, device=dev)
    if B == 0:
        return out
    block, nb, bmax, bmin, cnt, buf = _search_state(B, V, dev)
    val = torch.empty_like(bmax)
    idx = torch.empty(B, nb, dtype=torch.int32, device=dev)
    parts = torch.empty(B, nb, 2, dtype=torch.float32, device=dev)
    xw = torch.empty(B, dtype=torch.float32, device=dev)
    floor = torch.empty(B, dtype=torch.float32, device=dev)
    min_p = min_p.float().contiguous()
    launch = pdl.launch_kwargs(dev) if SELECT_PDL else {"PDL": False}
    warps = 8 if block >= 4096 else 4
    sx = logits.stride(0)
    kth = None
    if top_k is None:
        _block_best_kernel[(B, nb)](logits, scale, seed, logits, val, idx, bmax, bmin, cnt, V, sx, nb,
                                    2 * SEARCH_PASSES, 0, BLOCK=block, RACE=True, FLOOR=False, STATS=True, SKIP=False,
                                    FAST=_fast(), num_warps=warps, **launch)
    else:
        lb = _row_stats(logits, scale, bmax, bmin, cnt, block, top_k)
        kth = torch.empty(B, dtype=torch.float32, device=dev)
        _search(logits, bmax, bmin, min_p, top_k, kth, kth, cnt[0], buf, block, mass=False, has_k=False, scale=scale,
                lb=lb)
        _block_best_kernel[(B, nb)](logits, scale, seed, kth, val, idx, val, val, idx, V, sx, nb, 0, 0, BLOCK=block,
                                    RACE=True, FLOOR=True, STATS=False, SKIP=False, FAST=_fast(), num_warps=warps,
                                    **launch)
    kth_arg = kth if kth is not None else bmax
    _accept_sums_kernel[(B, nb)](logits, scale, bmax, min_p, kth_arg, val, idx, parts, xw, out, V, sx, nb, BLOCK=block,
                                 BNB=_bnb(nb), HAS_K=kth is not None, num_warps=warps, **launch)
    top_p = top_p.float().contiguous()
    _decide_kernel[(B,)](bmax, min_p, kth_arg, top_p, parts, xw, floor, nb, BNB=_bnb(nb), HAS_K=kth is not None,
                         num_warps=1)
    # only the refused rows search (~1 − top_p of them): spread each over more programs
    _search(logits, bmax, bmin, min_p, top_p, kth, floor, cnt[1], buf, ACCEPT_SEARCH_BLOCK, mass=True,
            has_k=kth is not None, scale=scale, accept=True)
    nb2 = triton.cdiv(V, BLOCK)
    val2 = torch.empty(B, nb2, dtype=torch.float32, device=dev)
    idx2 = torch.empty(B, nb2, dtype=torch.int32, device=dev)
    _block_best_kernel[(B, nb2)](logits, scale, seed, floor, val2, idx2, val2, val2, idx2, V, sx, nb2, 0,
                                 B * nb * (block // 4), BLOCK=BLOCK, RACE=True, FLOOR=True, STATS=False, SKIP=True,
                                 FAST=_fast(), num_warps=8, **launch)
    _row_best_kernel[(B,)](val2, idx2, out, floor, nb2, BNB=_bnb(nb2), SKIP=True, num_warps=1, **launch)
    return out
