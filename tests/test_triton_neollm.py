"""NeoLLM's fused decode kernels against their plain-PyTorch references, and the whole engine forward
with every Triton kernel against the reference forward: under Triton's interpreter on CPU at tiny shapes,
compiled on a GPU (marked `gpu`); tests/triton_mode.py picks the mode. State tests check that slots no row
addresses are bit-identical afterwards; pad rows (slot 0) may touch slot 0 only.
"""
from __future__ import annotations

import importlib
import random

import pytest
import torch
from triton_mode import DEVICES, DTYPES, INTERPRET, check_pools, fresh_process_test, rel_err

import triton  # noqa: E402  (after triton_mode chose the interpreter)

from harness import Harness, assert_close, reference_logits  # noqa: E402
from hybridserve.kernels import backend  # noqa: E402
from hybridserve.kernels import fused_triton as fused_tr  # noqa: E402
from hybridserve.kernels import gated_delta as gdn_ref  # noqa: E402
from hybridserve.kernels import gated_delta_triton as gdn_tr  # noqa: E402
from hybridserve.kernels import neollm_ops as ops_ref  # noqa: E402
from hybridserve.kernels import neollm_ops_triton as ops_tr  # noqa: E402
from hybridserve.models.neollm import NeoLLMConfig, NeoLLMModel  # noqa: E402
from hybridserve.weights.neollm_map import bind_neollm, synth_neollm  # noqa: E402


NUM_SLOTS = 6

test_cpu_kernels_in_fresh_process = fresh_process_test(__file__)


def tol(dtype) -> float:
    return 2e-2 if dtype == torch.bfloat16 else 2e-5


# ---------------------------------------------------------------- GDN decode step between the projections

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Hk,Hv,dk,dv,K", [(2, 4, 16, 16, 4), (2, 2, 16, 24, 3)])  # GVA r = 2; r = 1, dv not 2^n
def test_gdn_fused_decode(device, dtype, Hk, Hv, dk, dv, K):
    """Rows: two live slots and two pad rows (slot 0, so two programs share it); slots 2, 4, 6 unaddressed."""
    C, V = 2 * Hk * dk + Hv * dv, Hv * dv
    slots = torch.tensor([3, 0, 1, 0, 5], device=device)
    proj = (torch.randn(len(slots), C + V + 2 * Hv, device=device) * 2).to(dtype)
    conv_w = (torch.randn(C, K, device=device) * 0.5).to(dtype)
    # a + dt_bias over a wide range, past softplus's threshold of 20, with a mild A so that the decay keeps
    # the state: a wiped state leaves o ∝ k·q, whose cancellation turns one bf16 step of q or k into a
    # large relative error of that head's normed output
    A_log = torch.empty(Hv, device=device).uniform_(0.005, 0.05).log()
    dt_bias = torch.randn(Hv, device=device) * 4
    proj[:, -Hv:] *= 8
    norm_w = (1 + 0.1 * torch.randn(dv, device=device)).to(dtype)
    conv_pool = torch.randn(NUM_SLOTS + 1, C, K - 1, device=device).to(dtype)
    state_pool = torch.randn(NUM_SLOTS + 1, Hv, dk, dv, device=device)
    pools = [(conv_pool.clone(), state_pool.clone()) for _ in range(2)]
    args = (proj, conv_w, A_log, dt_bias, norm_w, 1e-6)
    ref = gdn_ref.fused_decode(*args, *pools[0], slots)
    out = gdn_tr.fused_decode(*args, *pools[1], slots)
    live = slots != 0
    assert out.shape == (len(slots), V) and out.dtype == dtype
    assert rel_err(out[live], ref[live]) < tol(dtype)
    check_pools(pools[1][0], pools[0][0], conv_pool, slots, 1e-12)       # the window is a copy: exact
    # bf16: the state moves by the q/k/v roundings (one bf16 step of the conv output moves v by up to 2^-7)
    check_pools(pools[1][1], pools[0][1], state_pool, slots, 1e-5 if dtype == torch.float32 else 1e-2)


# ---------------------------------------------------------------- GEMVs with NeoLLM's glue inside

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 5])        # up to fused_triton.GEMV_MAX_ROWS (2): the GEMV; more: cuBLAS
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("fan_p", [0, 8])
def test_add_scale_norm_linear(device, dtype, rows, with_delta, fan_p):
    """K not a multiple of the GEMV's K block; fp32 norm weight (LNS folded in) on model-dtype activations;
    with FAN: bias, and output columns n < P written twice (cos at n, sin at n + P)."""
    K, N = 600, 24
    h = torch.randn(rows, K, device=device, dtype=dtype)
    delta = torch.randn(rows, K, device=device, dtype=dtype) if with_delta else None
    nw = (torch.rand(K, device=device) + 0.5) * 0.7
    w = (torch.randn(N, K, device=device) * K ** -0.5 * 4).to(dtype)
    bias = torch.randn(N, device=device).to(dtype) if fan_p else None
    out_dtype = None if fan_p else torch.float32
    got = ops_tr.add_scale_norm_linear(h, delta, 0.8, nw, w, 1e-6, bias, fan_p, out_dtype)
    want = ops_ref.add_scale_norm_linear(h, delta, 0.8, nw, w, 1e-6, bias, fan_p, out_dtype)
    assert got[1].shape == want[1].shape == (rows, N + fan_p) and got[1].dtype == want[1].dtype
    assert got[0].dtype == dtype and rel_err(got[0], want[0]) < tol(dtype)
    assert rel_err(got[1], want[1]) < tol(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_add_scale_norm_linear_padded_head(device, rows, out_dtype):
    """An odd number of output rows (NeoLLM's 151,665-word head) with the weight in a row-padded buffer
    (layers.padded_rows): the same y as the unpadded weight, contiguous, N columns wide."""
    from hybridserve.models.layers import padded_rows
    K, N = 64, 37
    h = torch.randn(rows, K, device=device)
    nw = torch.rand(K, device=device) + 0.5
    w, buf = padded_rows(torch.randn(N, K, device=device) * K ** -0.5)
    assert buf.shape == (64, K) and w.data_ptr() == buf.data_ptr() and w.is_contiguous() and not buf[N:].any()
    got = ops_tr.add_scale_norm_linear(h, None, 1.0, nw, w, 1e-6, out_dtype=out_dtype, padded_weight=buf)[1]
    want = ops_ref.add_scale_norm_linear(h, None, 1.0, nw, w, 1e-6, out_dtype=out_dtype)[1]
    assert got.shape == (rows, N) and got.is_contiguous() and rel_err(got, want) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_poly_mul_linear(device, dtype, rows):
    inter, N = 600, 24
    gate_up = (torch.randn(rows, 2 * inter, device=device) * 2).to(dtype)
    pw = (1 / 3 + 0.05 * torch.randn(3, device=device)).to(dtype)
    pb = (0.2 * torch.randn(1, device=device)).to(dtype)
    w = (torch.randn(N, inter, device=device) * inter ** -0.5).to(dtype)
    got = ops_tr.poly_mul_linear(gate_up, pw, pb, w)
    want = ops_ref.poly_mul_linear(gate_up, pw, pb, w)
    assert got.shape == (rows, N) and got.dtype == dtype and rel_err(got, want) < tol(dtype)


# ---------------------------------------------------------------- the engine forward on Triton kernels

VOCAB = 512   # the tiny checkpoint's head cut down: the interpreter runs a GEMV's programs one by one


def tiny_model(dtype, **variant):
    config, tensors = synth_neollm("tiny", 0, **variant)
    config["vocab_size"] = VOCAB
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:VOCAB]
    full, bound, _ = bind_neollm(tensors, config)
    return NeoLLMModel(NeoLLMConfig.from_hf(full), bound, dtype)


def _triton_everywhere(name: str, fast: bool):
    try:
        return importlib.import_module(f"hybridserve.kernels.{name}_triton")
    except ImportError:
        return importlib.import_module(f"hybridserve.kernels.{name}")


@pytest.mark.skipif(not INTERPRET, reason="CPU interpreter run; the GPU runs the Triton path without forcing")
@pytest.mark.parametrize("variant", [{}, {"attn_output_gate": True, "fan_placement": "full_attention",
                                           "gpas_gates": 2}])
def test_engine_forward_on_triton_kernels(variant, monkeypatch):
    """Every kernel the Triton one: prefill of 2 rows (the GEMVs) and of 5 (cuBLAS beside row kernels), decode
    at batch 1, at batch 2 and at batch 2 + a pad row; logits equal the reference forward's."""
    model = tiny_model(torch.float32, **variant)
    rng = random.Random(0)
    toks = [[rng.randrange(VOCAB) for _ in range(n)] for n in (5, 7)]
    refs = [reference_logits(model, t) for t in toks]          # before the patch: the plain kernels
    monkeypatch.setattr(backend, "_load", _triton_everywhere)
    # wide GEMV tiles (both GEMVs take fused_triton's): the interpreter's cost is per program
    monkeypatch.setattr(fused_tr, "gemv_config", lambda M, N, K, stacked=1: (64, triton.next_power_of_2(K), 4))
    h = Harness(model)
    a, b = h.new_seq(), h.new_seq()
    got_a = h.step([(a, toks[0][:2])]) + h.step([(a, [toks[0][2]])])
    got_b = h.step([(b, toks[1][:5])])
    for i in range(2):
        out = h.step([(a, [toks[0][3 + i]]), (b, [toks[1][5 + i]])], pad_rows=i)
        got_a.append(out[0])
        got_b.append(out[1])
    assert_close(torch.cat(got_a), refs[0])
    assert_close(torch.cat(got_b), refs[1])
