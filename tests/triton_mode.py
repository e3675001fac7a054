"""Shared set-up of the Triton kernel test modules (import it before anything that imports triton).

Without CUDA the kernels run under Triton's interpreter at tiny shapes. The interpreter is chosen when
triton is first imported (its own library functions are decorated then), so this module sets
TRITON_INTERPRET=1 before importing triton; if something imported triton earlier without it, the CPU
tests re-run their file in a fresh interpreter process instead (`fresh_process_test`, run in the
background: tests/background.py). With CUDA the same tests run compiled on the GPU (marked `gpu`).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import background


def _triton_compiled_mode() -> bool:
    std = sys.modules.get("triton.language.standard")
    return std is not None and type(std.sum).__name__ == "JITFunction"


HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and not _triton_compiled_mode():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
INTERPRET = not _triton_compiled_mode()

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]),
]
DTYPES = [torch.float32, torch.bfloat16]


def fresh_process_test(path: str):
    """A test for `path` that re-runs its CPU tests under the interpreter when triton was imported compiled."""
    @pytest.mark.skipif(HAS_CUDA or INTERPRET, reason="the CPU tests already run in this process")
    def test_cpu_kernels_in_fresh_process():   # run in the background from collection on (tests/background.py)
        code, output = background.result(path)
        assert code == 0, output
    if not (HAS_CUDA or INTERPRET):
        test_cpu_kernels_in_fresh_process.background_path = path    # conftest.py starts it when selected
    return test_cpu_kernels_in_fresh_process


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def check_pools(new: torch.Tensor, ref: torch.Tensor, before: torch.Tensor, slot_ids: torch.Tensor, tolerance):
    """Slots no row addresses are bit-identical to `before`; addressed live slots match `ref`."""
    touched = set(slot_ids.tolist())
    for s in range(new.shape[0]):
        if s not in touched:
            assert torch.equal(new[s], before[s]), f"unaddressed slot {s} changed"
        elif s != 0:
            assert rel_err(new[s], ref[s]) < tolerance, f"slot {s}: {rel_err(new[s], ref[s])}"
