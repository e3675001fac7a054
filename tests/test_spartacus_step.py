"""The persistent Spartacus decode-step kernel (kernels/spartacus_step_triton.py) against its reference
(kernels/spartacus_step.py) and against the per-layer Triton kernels it replaces: under Triton's
interpreter on CPU (one program, so every barrier is passed at once) and compiled on a GPU (marked `gpu`:
hundreds of programs meeting at each barrier, graph replays). Only the addressed state slot may change,
and the barrier counters are back at zero after every launch.
"""
from __future__ import annotations

import pytest
import torch
from triton_mode import DEVICES, DTYPES, HAS_CUDA, fresh_process_test, rel_err

from hybridserve.kernels import fused_triton as fused_tr  # noqa: E402
from hybridserve.kernels import monoid_triton as monoid_tr  # noqa: E402
from hybridserve.kernels import spartacus_step as step_ref  # noqa: E402
from hybridserve.kernels import spartacus_step_triton as step_tr  # noqa: E402
from hybridserve.kernels.spartacus_step import StepWeights  # noqa: E402

test_cpu_kernels_in_fresh_process = fresh_process_test(__file__)

NUM_SLOTS = 4
# (decay gate, full-width q/k norms, decay bias)
GATES = [("sigmoid", False, True), ("scalar_sigmoid", True, False), ("neg_softplus", False, False)]


def step_weights(device, dtype, gate: str, full: bool, bias: bool, L=2, E=64, H=4, D=16, FF=96, V=300) -> StepWeights:
    g = torch.Generator().manual_seed(0)
    A = H * D
    GW = H if gate == "scalar_sigmoid" else A
    QN = A if full else D

    def r(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    def norm_w(*shape, dt=dtype):
        return (torch.rand(*shape, generator=g) + 0.5).to(device=device, dtype=dt)

    return StepWeights(
        embed=r(V, E), attn_norm=norm_w(L, E), qkvz=r(L, 3 * A + GW, E, scale=E ** -0.5),
        q_norm=norm_w(L, QN, dt=torch.float32) * D ** -0.5, k_norm=norm_w(L, QN),
        decay_bias=r(L, GW, dt=torch.float32) if bias else None, o=r(L, E, A, scale=A ** -0.5),
        ffn_norm=norm_w(L, E), gate_up=r(L, 2 * FF, E, scale=E ** -0.5), down=r(L, E, FF, scale=FF ** -0.5),
        norm=norm_w(E), lm_head=r(V, E, scale=E ** -0.5), num_heads=H, head_dim=D, eps=1e-5, decay_gate=gate)


def per_kernel_step(sw: StepWeights, ids, slots, states):
    """The same step through the per-layer Triton kernels (what a batch-1 decode runs without the step kernel)."""
    return step_ref.decode_step(sw, ids, slots, states, fused_tr, monoid_tr)


def check_step(sw: StepWeights, device, other, other_tol, steps=2):
    """`steps` tokens through the step kernel and through `other` on copies of one state pool."""
    L, H, D = sw.num_layers, sw.num_heads, sw.head_dim
    g = torch.Generator().manual_seed(1)
    states = (torch.randn(L, NUM_SLOTS, H, D, D, generator=g) * 0.1).to(device)
    before, want_states = states.clone(), states.clone()
    slots = torch.tensor([2], device=device)
    for tok in [7, 11][:steps]:
        ids = torch.tensor([tok], device=device)
        got = step_tr.decode_step(sw, ids, slots, states)
        want = other(sw, ids, slots, want_states)
        assert got.shape == want.shape == (1, sw.lm_head.shape[0]) and got.dtype == torch.float32
        assert rel_err(got, want) < other_tol, rel_err(got, want)
        assert rel_err(states[:, 2], want_states[:, 2]) < other_tol
    for s in range(NUM_SLOTS):
        if s != 2:
            assert torch.equal(states[:, s], before[:, s]), f"slot {s} changed"
    assert step_tr.errors(sw) == 0
    assert not any(step_tr.counters(sw)), "barrier counters not reset"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gate,full,bias", GATES)
def test_step_matches_reference_fp32(device, gate, full, bias):
    sw = step_weights(device, torch.float32, gate, full, bias)
    check_step(sw, device, step_ref.decode_step, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_step_is_the_per_kernel_path(device, dtype, monkeypatch):
    """With the streamed GEMV on for every matmul (the step's GEMV phases are that kernel's rows), the
    step kernel does the per-layer kernels' arithmetic: bf16 outputs and states agree to rounding."""
    monkeypatch.setattr(fused_tr, "GEMV_STREAM", True)
    monkeypatch.setattr(fused_tr, "gemv_stream_config",
                        lambda N, K, stacked=1, after_block=False: (2 if stacked > 1 else 4, step_tr.BK_MAX,
                                                                   step_tr.WARPS, 4, False))
    sw = step_weights(device, dtype, "sigmoid", False, True)
    check_step(sw, device, per_kernel_step, 1e-6 if dtype == torch.float32 else 2e-3, steps=1)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_step_full_width_shapes_gpu():
    """Spartacus widths (2048 hidden, 32 heads of 64, 8192 MLP: whole 2048-wide K tiles, four for down),
    two layers, bf16, graph-captured and replayed against the per-layer kernels."""
    sw = step_weights("cuda", torch.bfloat16, "sigmoid", False, True, L=2, E=2048, H=32, D=64, FF=8192, V=4096)
    L, H, D = sw.num_layers, sw.num_heads, sw.head_dim
    states = torch.randn(L, NUM_SLOTS, H, D, D, device="cuda") * 0.1
    want_states = states.clone()
    ids = torch.tensor([5], device="cuda")
    slots = torch.tensor([3], device="cuda")
    step_tr.decode_step(sw, ids, slots, states.clone())        # compile + size the grid outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step_tr.decode_step(sw, ids, slots, states)
    for tok in [5, 9, 13]:
        ids.fill_(tok)
        graph.replay()
        want = per_kernel_step(sw, ids, slots, want_states)
        assert rel_err(out, want) < 2e-2 and out.argmax() == want.argmax()
        assert rel_err(states[:, 3], want_states[:, 3]) < 2e-2
    torch.cuda.synchronize()
    assert step_tr.errors(sw) == 0
    assert not any(step_tr.counters(sw))
