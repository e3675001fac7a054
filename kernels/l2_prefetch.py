"""Weights asked into L2 ahead of their matmul, from a kernel that leaves the memory bus idle.

A batch-1 decode layer's matmuls stream their weights at close to the copy bandwidth, but between the q|k|v
projection and the o projection the bus is mostly idle for ~10 µs (RoPE + KV write, the attention's split and
merge: a chain of short, latency-bound kernels). The next weights are known and constant during the step, so
the first of those kernels can ask for them: extra programs of its grid issue bulk L2 prefetches
(`cp.async.bulk.prefetch.L2`, Hopper's copy engine: one instruction per chunk, nothing held in registers, no
completion to wait for), and the matmul after the attention then reads them from L2.

A hint only: no result depends on it. It is compiled in where the device has the instruction (compute
capability 9+) and never under the interpreter (`enabled`).

Measured slower, so off (PREFETCH). On an H100 (bench/l2_prefetch.py, bench/results/l2_prefetch-h100.json,
Llama-3.2-3B's o projection), the streamed GEMV reads an L2-resident weight in 6.68 µs against 7.96 µs cold,
and the prefetch traffic delays a latency-bound kernel's own loads by about its length (2.14 → 6.1-8.2 µs).
Whole steps: Llama-3.2-3B 2.672-3.332 ms against 2.647 off (bench/NOTES.md, twentieth session).
"""
from __future__ import annotations

import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

from hybridserve.kernels import pdl

# The o projection's weight prefetched by the RoPE + KV write kernel (models/layers.py `norm_attention`) and
# by Spartacus's recurrence step. Off: slower. An A/B knob (HYBRIDSERVE_L2_PREFETCH=1).
PREFETCH = os.environ.get("HYBRIDSERVE_L2_PREFETCH", "0") == "1"
# Programs added to the host kernel's grid for it (per token row), and the bytes per prefetch instruction.
PROGRAMS = int(os.environ.get("HYBRIDSERVE_L2_PREFETCH_PROGRAMS", "32"))
CHUNK = int(os.environ.get("HYBRIDSERVE_L2_PREFETCH_CHUNK", str(1 << 14)))
# Issued before the host kernel's PDL wait (while the q|k|v projection still streams) instead of after it.
EARLY = os.environ.get("HYBRIDSERVE_L2_PREFETCH_EARLY", "0") == "1"
# One `prefetch.global.L2` per 128-byte line from every thread instead of bulk copies.
LINES = os.environ.get("HYBRIDSERVE_L2_PREFETCH_LINES", "0") == "1"
# Bytes of the weight after it (the MLP's gate|up) asked for too, from its start.
EXTRA_BYTES = int(os.environ.get("HYBRIDSERVE_L2_PREFETCH_EXTRA", "0"))


@lru_cache(maxsize=None)
def _has_instruction(device_index: int) -> bool:
    return os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` issue the prefetches (Hopper or newer, compiled, the knob on)."""
    if not PREFETCH or device.type != "cuda":
        return False
    return _has_instruction(device.index if device.index is not None else torch.cuda.current_device())


def _region(w: torch.Tensor | None, cap: int | None = None) -> tuple[torch.Tensor | None, int]:
    if w is None:
        return None, 0
    nbytes = w.numel() * w.element_size()
    if cap is not None:
        nbytes = min(nbytes, cap) // 16 * 16
    if not w.is_contiguous() or nbytes == 0 or nbytes % 16 or w.data_ptr() % 16:
        return None, 0
    return w, nbytes


def plan(weights, device: torch.device) -> tuple[torch.Tensor | None, int, torch.Tensor | None, int, int]:
    """(first weight, its bytes, next weight, its first bytes, programs) of a prefetch. `weights`: one
    contiguous weight, or (weight, the weight after it), of which the first EXTRA_BYTES go too. (None, 0, None,
    0, 0) where none is issued (off, the device lacks it, nothing to fetch, or bytes not in 16-byte units)."""
    if weights is None or not enabled(device):
        return None, 0, None, 0, 0
    first, after = (weights, None) if isinstance(weights, torch.Tensor) else weights
    w1, n1 = _region(first)
    w2, n2 = _region(after, EXTRA_BYTES) if EXTRA_BYTES else (None, 0)
    if w1 is None:
        return None, 0, None, 0, 0
    return w1, n1, w2, n2, PROGRAMS


def constexprs() -> dict:
    """The host kernel's prefetch constexprs (chunk bytes, line mode, early issue)."""
    return {"PF_CHUNK": 128 if LINES else CHUNK, "PF_LINES": LINES, "PF_EARLY": EARLY}


@triton.jit
def issue(ptr, nbytes, part, parts, LANES: tl.constexpr, CHUNK: tl.constexpr, LINES: tl.constexpr = False):
    """Program `part` of `parts` asks L2 for its chunks of the bytes [ptr, ptr + nbytes): chunk c goes to
    program c % parts, LANES of them per round. `nbytes` is a multiple of 16. LINES: one `prefetch.global.L2`
    per CHUNK bytes (CHUNK a line, 128) instead of bulk copies."""
    base = ptr.to(tl.pointer_type(tl.int8), bitcast=True)
    chunks = tl.cdiv(nbytes, CHUNK)
    lane = tl.arange(0, LANES)
    for r in range(0, tl.cdiv(chunks - part, parts * LANES)):
        off = (part + (r * LANES + lane) * parts).to(tl.int64) * CHUNK
        size = tl.minimum(nbytes - off, CHUNK).to(tl.int32)
        if LINES:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                "=r,l,r", [base + off, size], dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; "
                "mov.u32 $0, 0; }",
                "=r,l,r", [base + off, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def enter(PDL: tl.constexpr, go, ptr, nbytes, ptr2, nbytes2, part, parts, LANES: tl.constexpr,
          CHUNK: tl.constexpr, LINES: tl.constexpr, EARLY: tl.constexpr):
    """`pdl.enter`, with this program's share of two regions' prefetches (`issue`; where `go`) issued before
    the wait (EARLY: while the kernel before still runs) or after it. `nbytes2` 0: one region."""
    if EARLY:
        if go:
            issue(ptr, nbytes, part, parts, LANES, CHUNK, LINES)
            issue(ptr2, nbytes2, part, parts, LANES, CHUNK, LINES)
    if PDL:
        pdl.enter(PDL)
    if not EARLY:
        if go:
            issue(ptr, nbytes, part, parts, LANES, CHUNK, LINES)
            issue(ptr2, nbytes2, part, parts, LANES, CHUNK, LINES)
