"""Programmatic dependent launch (Hopper and newer): a kernel launched with it may start while the kernel
before it in the stream is still running, and waits (`gdc_wait`) only where it first reads that kernel's
output. A decode step at batch 1 is a chain of ~100 short matmuls; with this each one's weight stream
starts during its predecessor's tail instead of after a full drain and launch gap.

Contract for a kernel launched with `launch_pdl`: it must call `gdc_wait` before any load of data an
earlier kernel wrote (activations, caches, states touched this step) and before any store. Only reads of
data constant during the step (weights, and the step's metadata that the host copied in before it, such as
the sequence lengths) and of its own slot state before anything else touches it may come first; and, where the
kernel before releases this one only after its own wait (not EARLY_RELEASE), data that kernels two or more back
wrote (kernels/attn_res_triton.py COMMITTED_EARLY_ROWS). Kernels that
do not opt in behave as usual.

Where a kernel lets the next one launch (`enter`): after its own wait (the default), or before it
(`EARLY_RELEASE`, HYBRIDSERVE_PDL_EARLY=1). Early, a chain of kernels is launched ahead of the one running,
each program resident and holding its first weight tile while it waits; still correct, because a kernel's
wait returns only once the kernel before it has finished, and that one finished only after its own wait.

HYBRIDSERVE_PDL=0 turns it off (debugging, or to measure its effect).
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from functools import lru_cache

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# Release the next kernel's launch before this one's wait (the kernels' PDL constexpr is then 2), everywhere or
# only in the token mixer's kernels (RoPE + KV write, attention, recurrence step: launched with early=True).
# Off: even or slower. H100 decode graphs, context 128, three rounds in turn, default / early / mixer only
# (bench/results/decode_latency_pdl_early-h100.json): batch 1 Llama-3.2-3B shapes 2.645 / 2.734 / 2.735 ms,
# Kotodama-3B 2.608 / 2.670 / 2.623, NanoHammer 1.114 / 1.110 / 1.114, Spartacus 1.075 / 1.094 / 1.097;
# batch 8 within 1 %. A/B knobs.
EARLY_RELEASE = os.environ.get("HYBRIDSERVE_PDL_EARLY", "0") == "1"
EARLY_MIXER = os.environ.get("HYBRIDSERVE_PDL_EARLY_MIXER", "0") == "1"


@lru_cache(maxsize=None)
def has_launch_option(name: str) -> bool:
    """Whether this Triton's CUDA backend takes launch option `name` (launch_pdl, maxnreg)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return name in getattr(CUDAOptions, "__dataclass_fields__", {})


def register_cap(n: int | None, device: torch.device) -> dict:
    """Launch keyword for a per-thread register cap of `n` (none where `n` is None, off the GPU, or where this
    Triton lacks the option)."""
    return {"maxnreg": n} if n and device.type == "cuda" and has_launch_option("maxnreg") else {}


@lru_cache(maxsize=None)
def _supported(device_index: int) -> bool:
    if os.environ.get("HYBRIDSERVE_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if torch.cuda.get_device_capability(device_index)[0] < 9:
        return False
    # the gdc_* intrinsics are imported above; the launch attribute needs this triton's CUDA backend
    return has_launch_option("launch_pdl")


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch."""
    return device.type == "cuda" and _supported(device.index if device.index is not None else
                                                torch.cuda.current_device())


_local = threading.local()


@contextmanager
def without():
    """Kernels launched inside this block (this thread) go without PDL: a branch forked from another stream inside
    a CUDA graph (models/nanohammer.py SIDE_PLAIN)."""
    _local.off = getattr(_local, "off", 0) + 1
    try:
        yield
    finally:
        _local.off -= 1


def launch_kwargs(device: torch.device, early: bool = False) -> dict:
    """Extra keyword arguments for a Triton launch (PDL constexpr + the launch attribute); `early`: a token
    mixer's kernel (EARLY_MIXER)."""
    if not enabled(device) or getattr(_local, "off", 0):
        return {"PDL": False}
    return {"PDL": 2 if EARLY_RELEASE or (early and EARLY_MIXER) else 1, "launch_pdl": True}


@triton.jit
def enter(PDL: tl.constexpr):
    """A PDL kernel's wait for the kernel before it, and its release of the next launch (see EARLY_RELEASE);
    nothing when launched without PDL."""
    if PDL == 2:
        gdc_launch_dependents()
        gdc_wait()
    elif PDL:
        gdc_wait()
        gdc_launch_dependents()
