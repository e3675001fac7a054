"""Triton kernels against their plain-PyTorch references, on fresh random inputs.

Without CUDA the kernels run under Triton's interpreter at tiny shapes. The interpreter is chosen when
triton is first imported (its own library functions are decorated then), so this module sets
TRITON_INTERPRET=1 before importing triton; if something imported triton earlier without it, the CPU
tests re-run this file in a fresh interpreter process instead. With CUDA the same tests run compiled on
the GPU (marked `gpu`). Every state test also checks that slots no row addresses are bit-identical
afterwards; pad rows (slot 0) may touch slot 0 only.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F


def _triton_compiled_mode() -> bool:
    std = sys.modules.get("triton.language.standard")
    return std is not None and type(std.sum).__name__ == "JITFunction"


HAS_CUDA = torch.cuda.is_available()
TRITON_PREIMPORTED = _triton_compiled_mode()
if not HAS_CUDA and not TRITON_PREIMPORTED:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
INTERPRET = not _triton_compiled_mode()

from hybridserve.kernels import gated_delta as gdn_ref  # noqa: E402
from hybridserve.kernels import gated_delta_triton as gdn_tr  # noqa: E402
from hybridserve.kernels import monoid as monoid_ref  # noqa: E402
from hybridserve.kernels import monoid_triton as monoid_tr  # noqa: E402
from hybridserve.kernels import paged_attention as attn_ref  # noqa: E402
from hybridserve.kernels import paged_attention_triton as attn_tr  # noqa: E402
from hybridserve.kernels import short_conv as conv_ref  # noqa: E402
from hybridserve.kernels import short_conv_triton as conv_tr  # noqa: E402
from hybridserve.models.batch import BatchMeta  # noqa: E402


DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]),
]
DTYPES = [torch.float32, torch.bfloat16]
NUM_SLOTS = 6


@pytest.mark.skipif(HAS_CUDA or INTERPRET, reason="the CPU tests already run in this process")
def test_cpu_kernels_in_fresh_process():
    """triton was imported in compiled mode before this module: run the CPU tests where it was not."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", __file__],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def tol(dtype) -> float:
    return 2e-2 if dtype == torch.bfloat16 else 2e-3


def decode_slots(B: int, device) -> torch.Tensor:
    """Distinct live slots plus one pad row (slot 0) in the middle; one live slot stays unaddressed."""
    live = (torch.randperm(NUM_SLOTS - 1) + 1)[:B - 1]
    return torch.cat([live[:1], torch.zeros(1, dtype=torch.long), live[1:]]).to(device)


def cu_from(lens, device) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def check_pools(new: torch.Tensor, ref: torch.Tensor, before: torch.Tensor, slot_ids: torch.Tensor, tolerance):
    touched = set(slot_ids.tolist())
    for s in range(new.shape[0]):
        if s not in touched:
            assert torch.equal(new[s], before[s]), f"unaddressed slot {s} changed"
        elif s != 0:
            assert rel_err(new[s], ref[s]) < tolerance, f"slot {s}: {rel_err(new[s], ref[s])}"


def live_rows(slot_ids: torch.Tensor) -> torch.Tensor:
    return slot_ids != 0


# ---------------------------------------------------------------- monoid (Spartacus)

def monoid_inputs(n, H, dk, dv, dtype, device):
    q = (torch.randn(n, H, dk, device=device) * dk ** -0.5).to(dtype)
    k = F.silu(torch.randn(n, H, dk, device=device)).to(dtype)
    v = torch.randn(n, H, dv, device=device).to(dtype)
    log_a = F.logsigmoid(torch.randn(n, H, dk, device=device) * 4)   # includes very fast decays
    return q, k, v, log_a


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_monoid_decode(device, dtype):
    H, dk, dv, B = 2, 16, 32, 4
    pool = torch.randn(NUM_SLOTS + 1, H, dk, dv, device=device)
    slots = decode_slots(B, device)
    q, k, v, log_a = monoid_inputs(B, H, dk, dv, dtype, device)
    ref_pool, new_pool = pool.clone(), pool.clone()
    ref = monoid_ref.decode_step(q, k, v, log_a, ref_pool, slots)
    out = monoid_tr.decode_step(q, k, v, log_a, new_pool, slots)
    live = live_rows(slots)
    assert out.dtype == dtype and rel_err(out[live], ref[live]) < tol(dtype)
    check_pools(new_pool, ref_pool, pool, slots, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_monoid_prefill(device, dtype):
    H, dk, dv = 2, 16, 16
    lens = [1, 0, 17, 16, 3]               # empty, single token, one chunk, chunk + 1
    slots = torch.tensor([3, 0, 1, 5, 2], device=device)
    pool = torch.randn(NUM_SLOTS + 1, H, dk, dv, device=device)
    q, k, v, log_a = monoid_inputs(sum(lens), H, dk, dv, dtype, device)
    cu = cu_from(lens, device)
    ref_pool, new_pool = pool.clone(), pool.clone()
    ref = monoid_ref.varlen_prefill(q, k, v, log_a, cu, ref_pool, slots)
    out = monoid_tr.varlen_prefill(q, k, v, log_a, cu, new_pool, slots)
    assert out.dtype == dtype and rel_err(out, ref) < tol(dtype)
    check_pools(new_pool, ref_pool, pool, slots, 1e-4)


# ---------------------------------------------------------------- gated delta rule (GDN)

def gdn_inputs(n, Hk, Hv, dk, dv, dtype, device):
    q = (F.normalize(torch.randn(n, Hk, dk, device=device), dim=-1) * dk ** -0.5).to(dtype)
    k = F.normalize(torch.randn(n, Hk, dk, device=device), dim=-1).to(dtype)
    v = torch.randn(n, Hv, dv, device=device).to(dtype)
    g = -F.softplus(torch.randn(n, Hv, device=device))
    beta = torch.rand(n, Hv, device=device)
    return q, k, v, g, beta


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_delta_decode(device, dtype):
    Hk, Hv, dk, dv, B = 2, 4, 16, 32, 4
    pool = torch.randn(NUM_SLOTS + 1, Hv, dk, dv, device=device)
    slots = decode_slots(B, device)
    q, k, v, g, beta = gdn_inputs(B, Hk, Hv, dk, dv, dtype, device)
    ref_pool, new_pool = pool.clone(), pool.clone()
    ref = gdn_ref.decode_step(q, k, v, g, beta, ref_pool, slots)
    out = gdn_tr.decode_step(q, k, v, g, beta, new_pool, slots)
    live = live_rows(slots)
    assert out.dtype == dtype and rel_err(out[live], ref[live]) < tol(dtype)
    check_pools(new_pool, ref_pool, pool, slots, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_delta_prefill(device, dtype):
    Hk, Hv, dk, dv = 1, 2, 16, 16
    lens = [1, 0, 13, 4]
    slots = torch.tensor([3, 0, 1, 5], device=device)
    pool = torch.randn(NUM_SLOTS + 1, Hv, dk, dv, device=device)
    q, k, v, g, beta = gdn_inputs(sum(lens), Hk, Hv, dk, dv, dtype, device)
    cu = cu_from(lens, device)
    ref_pool, new_pool = pool.clone(), pool.clone()
    ref = gdn_ref.varlen_prefill(q, k, v, g, beta, cu, ref_pool, slots)
    out = gdn_tr.varlen_prefill(q, k, v, g, beta, cu, new_pool, slots)
    assert out.dtype == dtype and rel_err(out, ref) < tol(dtype)
    check_pools(new_pool, ref_pool, pool, slots, 1e-4)


# ---------------------------------------------------------------- short conv

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_short_conv_decode(device, dtype):
    C, K, B = 48, 4, 4
    pool = torch.randn(NUM_SLOTS + 1, C, K - 1, device=device).to(dtype)
    w = torch.randn(C, K, device=device).to(dtype)
    x = torch.randn(B, C, device=device).to(dtype)
    slots = decode_slots(B, device)
    ref_pool, new_pool = pool.clone(), pool.clone()
    ref = conv_ref.decode_step(x, w, ref_pool, slots)
    out = conv_tr.decode_step(x, w, new_pool, slots)
    live = live_rows(slots)
    assert out.dtype == dtype and rel_err(out[live], ref[live]) < tol(dtype)
    check_pools(new_pool, ref_pool, pool, slots, 1e-12)   # the window is a copy: exact


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [2, 4])
def test_short_conv_prefill(device, dtype, K):
    C = 40
    lens = [1, 0, 2, 17, 3]                 # chunks shorter than K−1 shift in behind the old window
    slots = torch.tensor([3, 0, 1, 5, 2], device=device)
    pool = torch.randn(NUM_SLOTS + 1, C, K - 1, device=device).to(dtype)
    w = torch.randn(C, K, device=device).to(dtype)
    x = torch.randn(sum(lens), C, device=device).to(dtype)
    cu = cu_from(lens, device)
    ref_pool, new_pool = pool.clone(), pool.clone()
    ref = conv_ref.varlen_prefill(x, w, cu, ref_pool, slots)
    out = conv_tr.varlen_prefill(x, w, cu, new_pool, slots)
    assert out.dtype == dtype and rel_err(out, ref) < tol(dtype)
    check_pools(new_pool, ref_pool, pool, slots, 1e-12)


# ---------------------------------------------------------------- paged attention

def paged_setup(ctx, H, Hkv, D, page, dtype, device, spare_blocks=2):
    """Caches filled with random data and each sequence given random distinct pages (page 0 unused)."""
    max_blocks = max(-(-c // page) for c in ctx) + spare_blocks
    num_pages = sum(-(-c // page) for c in ctx) + 4
    k_cache = torch.randn(num_pages, page, Hkv, D, device=device).to(dtype)
    v_cache = torch.randn(num_pages, page, Hkv, D, device=device).to(dtype)
    bt = torch.zeros(len(ctx), max_blocks, dtype=torch.int32)
    free = (torch.randperm(num_pages - 1) + 1).tolist()
    for b, c in enumerate(ctx):
        n = -(-c // page)
        bt[b, :n] = torch.tensor(free[:n], dtype=torch.int32)
        free = free[n:]
    return k_cache, v_cache, bt.to(device)


def meta_for(qlens, ctx, bt, device, is_decode=False):
    T = sum(qlens)
    return BatchMeta(input_ids=torch.zeros(T, dtype=torch.long, device=device), positions=None,
                     cu_seqlens=cu_from(qlens, device), seq_lens=torch.tensor(ctx, dtype=torch.int32, device=device),
                     block_tables=bt, slot_mapping=None, slot_ids=None, logits_indices=None,
                     query_lens_cpu=list(qlens), seq_lens_cpu=list(ctx), is_decode=is_decode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [False, True])
def test_paged_decode(device, dtype, split, monkeypatch):
    if split:   # force several splits per sequence at these tiny lengths
        monkeypatch.setattr(attn_tr, "BLOCK_N", 16)
        monkeypatch.setattr(attn_tr, "MIN_SPLIT", 16)
    H, Hkv, D, page = 4, 2, 16, 4
    ctx = [1, 7, 37, 12]
    k_cache, v_cache, bt = paged_setup(ctx, H, Hkv, D, page, dtype, device)
    q = torch.randn(len(ctx), H, D, device=device).to(dtype)
    seq_lens = torch.tensor(ctx, dtype=torch.int32, device=device)
    meta = meta_for([1] * len(ctx), ctx, bt, device, is_decode=True)
    ref_o, ref_lse = attn_ref.reference(q, k_cache, v_cache, meta, 0.25, return_lse=True)
    o, lse = attn_tr.decode(q, k_cache, v_cache, bt, seq_lens, 0.25, return_lse=True)
    assert o.dtype == dtype and rel_err(o, ref_o) < tol(dtype)
    assert (lse - ref_lse).abs().max().item() < 1e-2
    assert torch.equal(attn_tr.decode(q, k_cache, v_cache, bt, seq_lens, 0.25), o)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_decode_empty_row(device):
    """A graph-padding row with seq_len 0 must give finite output (0) and lse −inf, not NaN."""
    k_cache, v_cache, bt = paged_setup([5, 0], 2, 1, 16, 4, torch.float32, device)
    q = torch.randn(2, 2, 16, device=device)
    o, lse = attn_tr.decode(q, k_cache, v_cache, bt, torch.tensor([5, 0], dtype=torch.int32, device=device),
                            0.25, return_lse=True)
    assert torch.isfinite(o).all() and (o[1] == 0).all() and torch.isneginf(lse[1]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_prefill(device, dtype, monkeypatch):
    monkeypatch.setattr(attn_tr, "BLOCK_N", 16)
    monkeypatch.setattr(attn_tr, "PREFILL_ROWS", 16)
    H, Hkv, D, page = 4, 2, 16, 4
    qlens = [3, 1, 20, 6]                   # prefix + chunk, decode row, fresh prompt, long prefix
    ctx = [9, 12, 20, 40]
    k_cache, v_cache, bt = paged_setup(ctx, H, Hkv, D, page, dtype, device)
    q = torch.randn(sum(qlens), H, D, device=device).to(dtype)
    meta = meta_for(qlens, ctx, bt, device)
    ref_o, ref_lse = attn_ref.reference(q, k_cache, v_cache, meta, 0.25, return_lse=True)
    o, lse = attn_tr.varlen_prefill(q, k_cache, v_cache, meta.cu_seqlens, meta.seq_lens, bt, 0.25,
                                    max(qlens), return_lse=True)
    assert o.dtype == dtype and rel_err(o, ref_o) < tol(dtype)
    assert (lse - ref_lse).abs().max().item() < 1e-2


# ---------------------------------------------------------------- CUDA graphs (GPU only)

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs CUDA, compiled Triton")
def test_decode_kernels_replay_in_cuda_graph():
    """Capture all decode kernels once, refill the static inputs, replay: same result as eager."""
    dev, dt = "cuda", torch.bfloat16
    B = 4
    slots = decode_slots(B, dev)
    m_in = monoid_inputs(B, 2, 64, 64, dt, dev)
    g_in = gdn_inputs(B, 2, 4, 32, 32, dt, dev)
    x = torch.randn(B, 64, device=dev, dtype=dt)
    w = torch.randn(64, 4, device=dev, dtype=dt)
    k_cache, v_cache, bt = paged_setup([30, 1, 64, 17], 8, 2, 64, 16, dt, dev)
    q = torch.randn(B, 8, 64, device=dev, dtype=dt)
    lens = torch.tensor([30, 1, 64, 17], dtype=torch.int32, device=dev)
    m_pool = torch.randn(NUM_SLOTS + 1, 2, 64, 64, device=dev)
    g_pool = torch.randn(NUM_SLOTS + 1, 4, 32, 32, device=dev)
    c_pool = torch.randn(NUM_SLOTS + 1, 64, 3, device=dev, dtype=dt)

    def step():
        return (monoid_tr.decode_step(*m_in, m_pool, slots), gdn_tr.decode_step(*g_in, g_pool, slots),
                conv_tr.decode_step(x, w, c_pool, slots), attn_tr.decode(q, k_cache, v_cache, bt, lens, 0.125))

    pools = (m_pool, g_pool, c_pool)
    saved = [p.clone() for p in pools]
    step()                                            # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for p, s in zip(pools, saved):
        p.copy_(s)
    fresh = (*monoid_inputs(B, 2, 64, 64, dt, dev), *gdn_inputs(B, 2, 4, 32, 32, dt, dev),
             torch.randn_like(x), torch.randn_like(q))
    for t, new in zip((*m_in, *g_in, x, q), fresh):
        t.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    got = [o.clone() for o in outs]
    got_pools = [p.clone() for p in pools]
    for p, s in zip(pools, saved):
        p.copy_(s)
    want = step()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for a, b in zip(got_pools, pools):
        assert torch.equal(a, b)


# -- fused per-layer glue ------------------------------------------------------------------------

from hybridserve.kernels import fused as fused_ref  # noqa: E402
from hybridserve.kernels import fused_triton as fused_tr  # noqa: E402


def _close(a, b, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    err = (a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)
    assert err < tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_rms_norm(device, dtype):
    x = torch.randn(5, 3, 48, device=device, dtype=dtype)
    w = torch.randn(48, device=device, dtype=dtype)
    _close(fused_tr.rms_norm(x, w, 1e-6), fused_ref.rms_norm(x, w, 1e-6), dtype)
    view = torch.randn(7, 200, device=device, dtype=dtype)[:, 8:56].view(7, 3, 16)  # a strided split view
    _close(fused_tr.rms_norm(view, w[:16], 1e-5), fused_ref.rms_norm(view, w[:16], 1e-5), dtype)
    flat = torch.randn(4, 40, device=device, dtype=dtype)
    _close(fused_tr.rms_norm(flat, None, 1e-5), fused_ref.rms_norm(flat, None, 1e-5), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_silu_mul(device, dtype):
    gu = torch.randn(6, 2 * 40, device=device, dtype=dtype)
    _close(fused_tr.silu_mul(gu), fused_ref.silu_mul(gu), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rot", [16, 8])
def test_fused_rope(device, rot):
    x = torch.randn(5, 100, device=device)[:, 4:84].view(5, 5, 16)  # strided, 5 heads of 16
    ang = torch.rand(5, rot // 2, device=device) * 50
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    _close(fused_tr.rope(x, cos, sin), fused_ref.rope(x, cos, sin), torch.float32)


from hybridserve.kernels import attn_res as route_ref  # noqa: E402
from hybridserve.kernels import attn_res_triton as route_tr  # noqa: E402


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_sources", [2, 5, 7])
def test_attn_res_route(device, dtype, n_sources):
    sources = [torch.randn(4, 40, device=device, dtype=dtype) * (1 + i) for i in range(n_sources)]
    q, w = torch.randn(40, device=device, dtype=dtype), torch.rand(40, device=device, dtype=dtype) + 0.5
    _close(route_tr.route(sources, q, w, 1e-5), route_ref.route(sources, q, w, 1e-5), dtype)
