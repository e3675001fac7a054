"""A step's packed inputs in one kernel, beside `kernels/input_fetch.py` (same call, same result).

The reference is up to three device operations before each replay: a copy from the pinned buffer (the copy
engine's transfer, then its hand-over to the compute stream), a second copy for a block table's used columns,
and an index_select for the tokens of an async-scheduled step. Here one kernel reads the pinned buffer over the
bus itself (pinned host memory is mapped into the device's address space) and writes the device buffer, the
table's used columns and the gathered tokens. On an H100, batch 1 back to back, over the replay alone
(bench/results/input_fetch-h100.json): the models with a KV cache 10.8–11.1 µs a step with the earlier single copy
(of the whole block-table rows), 3.5–4.6 with this kernel; async-scheduled steps (that copy and an index_select)
13.4–14.6 µs against 3.7–4.7. Spartacus (no block table: 64 bytes) 1.9 µs copied, 3.1 here (async: 4.1 and 3.3).

Programs [0, flat blocks) copy bytes [0, end) in words, program 0 also the gather; the rest copy one row's
block of table columns each.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridserve.kernels.input_fetch import check

BLOCK = 1024      # words a program copies
GATHER_BLOCK = 128   # tokens program 0 gathers at a time

_SIZES = ["n_flat", "flat_blocks", "t_off", "t_stride", "t_cols", "t_blocks", "g_dst", "g_src", "g_n"]


# Sizes and offsets are not specialised on (1, multiples of 16): the kernel has one compiled variant with a gather
# and one without, both built when the packed inputs are (`warm`), so no step compiles one later.
@triton.jit(do_not_specialize=_SIZES)
def _fetch_kernel(src32, dst32, src64, dst64, values, n_flat, flat_blocks, t_off, t_stride, t_cols, t_blocks,
                  g_dst, g_src, g_n, BLOCK: tl.constexpr, BG: tl.constexpr, GATHER: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    if pid < flat_blocks:
        w = pid * BLOCK + offs
        m = w < n_flat
        if GATHER:    # the gathered tokens' words come from the device, below
            m &= (w < 2 * g_dst) | (w >= 2 * (g_dst + g_n))
        tl.store(dst32 + w, tl.load(src32 + w, mask=m), mask=m)
        if GATHER:
            if pid == 0:
                for start in range(0, g_n, BG):
                    i = start + tl.arange(0, BG)
                    mi = i < g_n
                    prev = tl.load(src64 + g_src + i, mask=mi, other=0)
                    tl.store(dst64 + g_dst + i, tl.load(values + prev, mask=mi), mask=mi)
    else:
        q = pid - flat_blocks
        r = q // t_blocks
        c = (q % t_blocks) * BLOCK + offs
        m = c < t_cols
        w = t_off + r * t_stride + c
        tl.store(dst32 + w, tl.load(src32 + w, mask=m), mask=m)


def fetch(host: torch.Tensor, dev: torch.Tensor, end: int, table: tuple[int, int, int, int] | None = None,
          gather: tuple[int, int, int, torch.Tensor] | None = None) -> None:
    check(host, dev, end, table, gather)
    n_flat = end // 4
    flat_blocks = triton.cdiv(n_flat, BLOCK)
    off, stride, rows, cols = table if table is not None else (0, 0, 0, 0)
    t_blocks = triton.cdiv(cols, BLOCK)
    dst, src, n, values = gather if gather is not None and gather[2] else (0, 0, 0, None)
    grid = flat_blocks + rows * t_blocks
    if grid == 0:
        return
    s32, d32 = host.view(torch.int32), dev.view(torch.int32)
    s64, d64 = host.view(torch.int64), dev.view(torch.int64)
    _fetch_kernel[(grid,)](s32, d32, s64, d64, d64 if values is None else values, n_flat, flat_blocks, off,
                           max(stride, 1), cols, max(t_blocks, 1), dst, src, n, BLOCK=BLOCK, BG=GATHER_BLOCK,
                           GATHER=values is not None, num_warps=4)


def warm(host: torch.Tensor, dev: torch.Tensor) -> None:
    """Compiles both variants (with and without a gather) on a buffer pair whose first 16 bytes are zero on both
    sides, which they stay: element 0 gathers values[0] from dev itself."""
    fetch(host, dev, 16)
    fetch(host, dev, 16, None, (0, 0, 1, dev.view(torch.int64)))
