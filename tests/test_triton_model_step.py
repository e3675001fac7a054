"""Whole decode steps of tiny models through the Triton kernel files, against the same steps through the
references. On CPU the Triton kernels run under the interpreter (HYBRIDSERVE_KERNELS=triton: the models would
pick the references there); on a GPU they run compiled. Batches of 1, 2 and 3 rows reach the
three matmul paths of these narrow models: the one-row GEMV, the two-row GEMV (kernels/fused_triton.py
`gemv_rows`) and cuBLAS. Under the interpreter every program costs milliseconds, so the vocabulary is cut
to 512 rows and the GEMV takes 16 rows a program (its tile rule is the kernel tests' matter)."""
from __future__ import annotations

import random

import pytest
import torch
from triton_mode import DEVICES, fresh_process_test, rel_err

from hybridserve.kernels import fused_triton
from hybridserve.weights.synth import GENERATORS

from harness import Harness
from model_zoo import tiny_model

VOCAB = 512
test_cpu_kernels_in_fresh_process = fresh_process_test(__file__)


def steps(model, batch: int) -> torch.Tensor:
    """A one-token prompt per sequence, then two decode steps: the logits of every step."""
    rng = random.Random(batch)
    h = Harness(model, num_pages=32)
    seqs = [h.new_seq() for _ in range(batch)]
    out = []
    for _ in range(3):
        out.append(torch.cat(h.step([(s, [rng.randrange(VOCAB)]) for s in seqs])))
    return torch.cat(out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", sorted(GENERATORS))
def test_decode_steps_through_triton_files(device, arch, monkeypatch):
    model = tiny_model(arch, device, torch.float32, vocab=VOCAB)
    monkeypatch.setenv("HYBRIDSERVE_KERNELS", "reference")     # on CUDA too
    want = {b: steps(model, b) for b in (1, 2, 3)}
    monkeypatch.setenv("HYBRIDSERVE_KERNELS", "triton")
    if device == "cpu":
        monkeypatch.setattr(fused_triton, "gemv_config", lambda M, N, K, stacked=1: (16, 128, 4))
    rows, gemv = [], fused_triton._gemv
    monkeypatch.setattr(fused_triton, "_gemv", lambda x, *a, **k: rows.append(x.shape[0]) or gemv(x, *a, **k))
    for b, ref in want.items():
        rows.clear()
        got = steps(model, b)
        # compiled, the attention's fp32 dots run as TF32 (~1e-3, as in tests/test_gpu_graphs.py)
        assert rel_err(got, ref) < (1e-4 if device == "cpu" else 3e-3), (b, rel_err(got, ref))
        # the row count each matmul saw: the GEMV for 1 and 2 rows of these narrow models, never for 3
        assert (max(rows, default=0) == b) if b < 3 else not rows
