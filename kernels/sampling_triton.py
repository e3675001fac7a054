"""Triton versions of kernels/sampling.py. A row of a 49k–128k vocabulary is one long reduction, which
PyTorch runs in one block per row (~25 µs for a 128k argmax on an H100, ~35 µs a softmax); here each row is
split over many programs (stage 1: a block's best key and its index), then one small program per row picks
the best block (stage 2). Ties keep the lowest index, as torch.argmax. CUDA-graph safe: the race's seed is
read from device memory."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _block_best_kernel(x_ptr, scale_ptr, seed_ptr, floor_ptr, val_ptr, idx_ptr, V, sx, NB, BLOCK: tl.constexpr,
                       RACE: tl.constexpr, FLOOR: tl.constexpr):
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
def _row_best_kernel(val_ptr, idx_ptr, out_ptr, NB, BNB: tl.constexpr):
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
        _block_best_kernel[(B, nb)](logits, scale if race else logits, seed if race else logits,
                                    floor if floor is not None else logits, val, idx, V, logits.stride(0), nb,
                                    BLOCK=BLOCK, RACE=race, FLOOR=floor is not None, num_warps=8)
        _row_best_kernel[(B,)](val, idx, out, nb, BNB=max(16, triton.next_power_of_2(nb)), num_warps=1)
    return out


def argmax(logits: torch.Tensor) -> torch.Tensor:
    return _best(logits, None, None)


def race(logits: torch.Tensor, scale: torch.Tensor, seed: torch.Tensor,
         floor: torch.Tensor | None = None) -> torch.Tensor:
    return _best(logits, scale.float().contiguous(), seed, None if floor is None else floor.float().contiguous())
