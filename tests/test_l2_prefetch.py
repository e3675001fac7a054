"""Weights asked into L2 by a decode kernel's extra programs (kernels/l2_prefetch.py): a hint that must change
nothing. On a GPU the kernels that host it give bit-identical outputs, caches and states with and without it,
for every host grid (batch rows), program count, chunk size, early issue and a second region; on CPU (the
references, the interpreter) it is never issued and the references take the argument and ignore it."""
from __future__ import annotations

import pytest
import torch

from hybridserve.kernels import fused as fused_ref
from hybridserve.kernels import l2_prefetch
from hybridserve.kernels import monoid as monoid_ref

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


def test_not_issued_on_cpu(monkeypatch):
    monkeypatch.setattr(l2_prefetch, "PREFETCH", True)
    w = torch.randn(64, 32)
    assert l2_prefetch.plan(w, w.device) == (None, 0, None, 0, 0)
    assert l2_prefetch.plan((w, w), w.device) == (None, 0, None, 0, 0)


def test_references_take_and_ignore_it():
    """The references' results do not depend on the hint's argument."""
    T, H, Hkv, D = 2, 4, 2, 16
    x = torch.randn(T, H + 2 * Hkv, D)
    ang = torch.rand(T, D // 2) * 50
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    slots = torch.tensor([3, 6])
    caches = [torch.zeros(2, 4, Hkv, D) for _ in range(4)]
    w = torch.randn(H * D, H * D)
    a = fused_ref.rope_write_kv(x, cos, sin, H, caches[0], caches[1], slots)
    b = fused_ref.rope_write_kv(x, cos, sin, H, caches[2], caches[3], slots, prefetch=(w, w))
    assert torch.equal(a, b) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    qkvz = torch.randn(1, 4 * H * D)
    pools = [torch.randn(2, H, D, D) for _ in range(2)]
    pools[1].copy_(pools[0])
    args = (qkvz, torch.ones(D), torch.ones(D), None, H, D, 1e-5, "sigmoid")
    o1 = monoid_ref.fused_decode(*args, pools[0], torch.tensor([1]))
    o2 = monoid_ref.fused_decode(*args, pools[1], torch.tensor([1]), prefetch=w)
    assert torch.equal(o1, o2) and torch.equal(pools[0], pools[1])


def _knobs(monkeypatch, programs, chunk, early, extra):
    monkeypatch.setattr(l2_prefetch, "PREFETCH", True)        # an opt-in knob (slower where measured)
    monkeypatch.setattr(l2_prefetch, "LINES", chunk == 128)
    monkeypatch.setattr(l2_prefetch, "PROGRAMS", programs)
    monkeypatch.setattr(l2_prefetch, "CHUNK", chunk)
    monkeypatch.setattr(l2_prefetch, "EARLY", early)
    monkeypatch.setattr(l2_prefetch, "EXTRA_BYTES", extra)


# (programs, chunk bytes (128: one line a thread), early, bytes of the second region)
SETTINGS = [(32, 1 << 14, False, 0), (7, 4096, True, 1 << 20), (128, 1 << 16, False, 3 << 18), (528, 128, False, 0)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("programs,chunk,early,extra", SETTINGS)
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("heads,kv_heads,dim", [(24, 8, 128), (4, 2, 16)])
def test_rope_write_kv_same_with_prefetch(monkeypatch, programs, chunk, early, extra, T, heads, kv_heads, dim):
    from hybridserve.kernels import fused_triton
    _knobs(monkeypatch, programs, chunk, early, extra)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(T, heads + 2 * kv_heads, dim, device=dev, dtype=torch.bfloat16)
    ang = torch.rand(T, dim // 2, device=dev) * 50
    cos = torch.cat([ang, ang], -1).cos().to(torch.bfloat16)
    sin = torch.cat([ang, ang], -1).sin().to(torch.bfloat16)
    slots = torch.randperm(4 * 16, device=dev)[:T]
    caches = [torch.randn(4, 16, kv_heads, dim, device=dev, dtype=torch.bfloat16) for _ in range(2)]
    again = [c.clone() for c in caches]
    o_w = torch.randn(heads * dim, heads * dim, device=dev, dtype=torch.bfloat16)   # 18.9 MB at the large shape
    gate_up = torch.randn(4 * heads * dim, heads * dim, device=dev, dtype=torch.bfloat16)
    assert l2_prefetch.plan((o_w, gate_up), dev)[-1] == programs
    plain = fused_triton.rope_write_kv(x, cos, sin, heads, *caches, slots)
    hinted = fused_triton.rope_write_kv(x, cos, sin, heads, *again, slots, prefetch=(o_w, gate_up))
    torch.cuda.synchronize()
    assert torch.equal(plain, hinted)
    assert all(torch.equal(a, b) for a, b in zip(caches, again))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("programs,chunk,early,extra", SETTINGS)
@pytest.mark.parametrize("B", [1, 3])
def test_monoid_decode_same_with_prefetch(monkeypatch, programs, chunk, early, extra, B):
    from hybridserve.kernels import monoid_triton
    _knobs(monkeypatch, programs, chunk, early, extra)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    H, D = 32, 64
    W = H * D
    qkvz = torch.randn(B, 4 * W, device=dev, dtype=torch.bfloat16)
    q_norm, k_norm = torch.rand(D, device=dev) + 0.5, (torch.rand(D, device=dev) + 0.5).to(torch.bfloat16)
    pool = torch.randn(6, H, D, D, device=dev)
    again = pool.clone()
    slots = torch.arange(1, B + 1, device=dev)
    o_w = torch.randn(W, W, device=dev, dtype=torch.bfloat16)
    args = (qkvz, q_norm, k_norm, None, H, D, 1e-5, "sigmoid")
    plain = monoid_triton.fused_decode(*args, pool, slots)
    hinted = monoid_triton.fused_decode(*args, again, slots, prefetch=o_w)
    torch.cuda.synchronize()
    assert torch.equal(plain, hinted) and torch.equal(pool, again)

