"""Triton kernels against their plain-PyTorch references, on fresh random inputs: under Triton's interpreter
on CPU at tiny shapes, compiled on a GPU (marked `gpu`); tests/triton_mode.py picks the mode. Every state
test also checks that slots no row addresses are bit-identical afterwards; pad rows (slot 0) may touch
slot 0 only.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from triton_mode import DEVICES, DTYPES, HAS_CUDA, INTERPRET, check_pools, fresh_process_test, rel_err

from hybridserve.kernels import gated_delta as gdn_ref  # noqa: E402
from hybridserve.kernels import gated_delta_triton as gdn_tr  # noqa: E402
from hybridserve.kernels import monoid as monoid_ref  # noqa: E402
from hybridserve.kernels import monoid_triton as monoid_tr  # noqa: E402
from hybridserve.kernels import paged_attention as attn_ref  # noqa: E402
from hybridserve.kernels import paged_attention_triton as attn_tr  # noqa: E402
from hybridserve.kernels import short_conv as conv_ref  # noqa: E402
from hybridserve.kernels import short_conv_triton as conv_tr  # noqa: E402
from hybridserve.models.batch import BatchMeta  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    """Each test draws the same random inputs on every run (bf16 checks of a few outputs sit near their
    tolerance for some draws)."""
    torch.manual_seed(0)


NUM_SLOTS = 6

test_cpu_kernels_in_fresh_process = fresh_process_test(__file__)


def tol(dtype) -> float:
    return 2e-2 if dtype == torch.bfloat16 else 2e-3


def decode_slots(B: int, device) -> torch.Tensor:
    """Distinct live slots plus one pad row (slot 0) in the middle; one live slot stays unaddressed."""
    live = (torch.randperm(NUM_SLOTS - 1) + 1)[:B - 1]
    return torch.cat([live[:1], torch.zeros(1, dtype=torch.long), live[1:]]).to(device)


def cu_from(lens, device) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


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


DECODE_SHAPE = (4, 2, 16, 4)     # H, Hkv, D, page of the paged decode tests


def decode_setup(ctx, dtype, device, split, fused_merge, monkeypatch):
    """Paged caches for contexts `ctx` and their seq_lens; `split` forces several splits per sequence at
    these tiny lengths; `fused_merge`: the splits merged inside the attention kernel or by the merge kernel."""
    if split:
        monkeypatch.setattr(attn_tr, "BLOCK_N", 16)
        monkeypatch.setattr(attn_tr, "MIN_SPLIT", 16)
    monkeypatch.setattr(attn_tr, "FUSED_MERGE", fused_merge)
    H, Hkv, D, page = DECODE_SHAPE
    return (*paged_setup(ctx, H, Hkv, D, page, dtype, device), torch.tensor(ctx, dtype=torch.int32, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("fused_merge", [False, True])
def test_paged_decode(device, dtype, split, fused_merge, monkeypatch):
    H, Hkv, D, page = DECODE_SHAPE
    ctx = [1, 7, 37, 12]
    k_cache, v_cache, bt, seq_lens = decode_setup(ctx, dtype, device, split, fused_merge, monkeypatch)
    q = torch.randn(len(ctx), H, D, device=device).to(dtype)
    meta = meta_for([1] * len(ctx), ctx, bt, device, is_decode=True)
    ref_o, ref_lse = attn_ref.reference(q, k_cache, v_cache, meta, 0.25, return_lse=True)
    o, lse = attn_tr.decode(q, k_cache, v_cache, bt, seq_lens, 0.25, return_lse=True)
    assert o.dtype == dtype and rel_err(o, ref_o) < tol(dtype)
    assert (lse - ref_lse).abs().max().item() < 1e-2
    assert torch.equal(attn_tr.decode(q, k_cache, v_cache, bt, seq_lens, 0.25), o)
    if split and not fused_merge:   # the merge: one partial in its small tile, the 37's three in steps of two
        monkeypatch.setattr(attn_tr, "MERGE_SMALL", 1)
        monkeypatch.setattr(attn_tr, "MERGE_CHUNK_BIG", 2)
        o2, lse2 = attn_tr.decode(q, k_cache, v_cache, bt, seq_lens, 0.25, return_lse=True)
        assert rel_err(o2, ref_o) < tol(dtype) and (lse2 - ref_lse).abs().max().item() < 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("fused_merge", [False, True])
def test_paged_decode_with_entry(device, dtype, split, fused_merge, monkeypatch):
    """One extra key/value per sequence (NanoHammer's state entry, strided views as the model passes
    them) folded into the decode kernel equals attention over the tokens merged with it through the
    log-sum-exp; a row with no tokens attends to the entry alone."""
    H, Hkv, D, page = DECODE_SHAPE
    ctx = [1, 7, 37, 0]
    k_cache, v_cache, bt, seq_lens = decode_setup(ctx, dtype, device, split, fused_merge, monkeypatch)
    q = torch.randn(len(ctx), H, D, device=device).to(dtype)
    kv = torch.randn(len(ctx), 2, Hkv, D, device=device).to(dtype)
    entry = (kv[:, 0], kv[:, 1])
    o_c, lse = attn_ref.decode(q, k_cache, v_cache, bt, seq_lens, 0.25, return_lse=True)
    o_c = o_c.masked_fill((seq_lens == 0)[:, None, None], 0)    # the reference's row without tokens: NaN
    want = attn_ref.merge_entry(o_c, lse, q, *entry, 0.25)
    ref = attn_ref.decode(q, k_cache, v_cache, bt, seq_lens, 0.25, entry=entry)
    got, got_lse = attn_tr.decode(q, k_cache, v_cache, bt, seq_lens, 0.25, return_lse=True, entry=entry)
    assert got.dtype == dtype and rel_err(got, want) < tol(dtype) and rel_err(ref, want) < tol(dtype)
    _, ref_lse = attn_ref.decode(q, k_cache, v_cache, bt, seq_lens, 0.25, return_lse=True, entry=entry)
    assert (got_lse - ref_lse).abs().max().item() < 1e-2
    _close(got[3], entry[1][3].repeat_interleave(H // Hkv, dim=0), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [False, True])
def test_paged_decode_kv_early(device, dtype, split, monkeypatch):
    """With KV_EARLY (each split program's first k/v tile and the own key's page read before its PDL wait, the
    own key taken apart from the tile loop): the same checks, with and without the entry."""
    monkeypatch.setattr(attn_tr, "KV_EARLY", True)
    test_paged_decode(device, dtype, split, False, monkeypatch)
    test_paged_decode_with_entry(device, dtype, split, False, monkeypatch)


def step_inputs(B, Hkv, D, page, ctx, bt, variant, dtype, device):
    """A decode step's rotary rows (partial rotation for qk_norm_partial_rot), QK-norm weights, entries (entry)
    and each row's KV slot (the last row a pad row at slot 0): (cos, sin, norms, entry, slots)."""
    rot = 8 if variant == "qk_norm_partial_rot" else D
    ang = torch.rand(B, rot // 2, device=device) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    norms = ((torch.rand(D, device=device) + 0.5).to(dtype), (torch.rand(D, device=device) + 0.5).to(dtype)) \
        if variant == "qk_norm_partial_rot" else (None, None)
    entry = None
    if variant == "entry":
        kv = torch.randn(B, 2, Hkv, D, device=device).to(dtype)
        entry = (kv[:, 0], kv[:, 1])
    slots = torch.tensor([(bt[b, (c - 1) // page].item() * page + (c - 1) % page) for b, c in enumerate(ctx[:-1])]
                         + [0], device=device)
    return cos, sin, norms, entry, slots


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("variant", ["plain", "qk_norm_partial_rot", "entry"])
def test_paged_decode_step(device, dtype, split, variant, monkeypatch):
    """QK-norm, RoPE, the KV write and attention in one kernel equal rope_write_kv then the reference
    decode: same output, same pages written (the pad row's slot 0 included), other pages untouched; with the
    merge kernel (FUSED_MERGE off) too. The pad row's output (discarded by the engine) is not compared: the
    kernel takes each row's own key from registers, where the reference reads it back through the row's block
    table, and a pad row's dummy table does not hold its slot."""
    from hybridserve.kernels import fused as fused_ref

    H, Hkv, D, page = DECODE_SHAPE
    ctx = [1, 7, 37, 12, 1]                       # row 4: a graph pad row (slot 0)
    k_cache, v_cache, bt, seq_lens = decode_setup(ctx, dtype, device, split, False, monkeypatch)
    B = len(ctx)
    qkv = torch.randn(B, 2 * (H + 2 * Hkv), D, device=device).to(dtype)[:, ::2]    # strided heads: copied
    cos, sin, norms, entry, slots = step_inputs(B, Hkv, D, page, ctx, bt, variant, dtype, device)
    caches_ref = (k_cache.clone(), v_cache.clone())
    want = attn_ref.decode_step(qkv, cos, sin, H, *caches_ref, slots, bt, seq_lens, 0.25, *norms, 1e-5, entry)
    for fused_merge in (True, False):
        monkeypatch.setattr(attn_tr, "FUSED_MERGE", fused_merge)
        caches = (k_cache.clone(), v_cache.clone())
        got = attn_tr.decode_step(qkv, cos, sin, H, *caches, slots, bt, seq_lens, 0.25, *norms, 1e-5, entry)
        assert got.dtype == dtype and rel_err(got[:-1], want[:-1]) < tol(dtype)
        for c, r, before in zip(caches, caches_ref, (k_cache, v_cache)):
            c, r, before = (t.view(-1, Hkv, D) for t in (c, r, before))
            assert rel_err(c[slots], r[slots]) < (1e-5 if dtype == torch.float32 else 1e-2)   # bf16: fp32 rotation
            assert rel_err(c[slots], before[slots]) > 0.1                                  # really written
            rest = torch.ones(c.shape[0], dtype=torch.bool, device=device)
            rest[slots] = False
            assert torch.equal(c[rest], before[rest])
    qk = fused_ref.rope_write_kv(qkv, cos, sin, H, k_cache.clone(), v_cache.clone(), slots, *norms, 1e-5)
    assert rel_err(attn_ref.decode(qk[:, :H], *caches_ref, bt, seq_lens, 0.25, entry=entry), want) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [4, 6])          # G = 2, and G = 3 (a head group padded to 4)
@pytest.mark.parametrize("variant", ["plain", "qk_norm_partial_rot", "entry"])
def test_attention_o_decode(device, dtype, H, variant, monkeypatch):
    """RoPE + KV write, attention and o projection in one kernel (several runs of rows per kv head, a part tile
    at the end) equal the reference's three steps: the same projection (here unrounded fp32 sums), the same
    pages written (the pad row's slot 0 included), other pages untouched."""
    from hybridserve.kernels import attention_o as ao_ref
    from hybridserve.kernels import attention_o_triton as ao_tr

    monkeypatch.setattr(ao_tr, "BLOCK_N", 16)
    monkeypatch.setattr(ao_tr, "ROWS", 8)
    monkeypatch.setattr(ao_tr, "PROGRAMS_PER_SM", 8)
    Hkv, D, page, N = 2, 16, 4, 44
    ctx = [1, 7, 37, 12, 1]                       # row 4: a graph pad row (slot 0); 37 keys: three 16-key tiles
    k_cache, v_cache, bt = paged_setup(ctx, H, Hkv, D, page, dtype, device)
    bt[4, 0] = 0      # the pad row's one key is its slot 0 (page 0), as the engine pads: the step's key is the last
    seq_lens = torch.tensor(ctx, dtype=torch.int32, device=device)
    B = len(ctx)
    assert ao_tr.runs(B, Hkv, N, torch.device(device)) > 1 or device == "cuda"
    qkv = torch.randn(B, H + 2 * Hkv, D, device=device).to(dtype)
    o_w = (torch.randn(N, H * D, device=device) / (H * D) ** 0.5).to(dtype)
    cos, sin, norms, entry, slots = step_inputs(B, Hkv, D, page, ctx, bt, variant, dtype, device)
    caches_ref = (k_cache.clone(), v_cache.clone())
    want = ao_ref.decode(qkv, cos, sin, H, *caches_ref, slots, bt, seq_lens, 0.25, o_w,
                         torch.zeros(B, N, device=device), *norms, 1e-5, entry)
    caches = (k_cache.clone(), v_cache.clone())
    got = ao_tr.decode(qkv, cos, sin, H, *caches, slots, bt, seq_lens, 0.25, o_w, torch.zeros(B, N, device=device),
                       *norms, 1e-5, entry)
    assert got.dtype == torch.float32 and rel_err(got, want) < tol(dtype)
    for c, r, before in zip(caches, caches_ref, (k_cache, v_cache)):
        c, r, before = (t.view(-1, Hkv, D) for t in (c, r, before))
        assert rel_err(c[slots], r[slots]) < (1e-5 if dtype == torch.float32 else 1e-2)
        assert rel_err(c[slots], before[slots]) > 0.1
        rest = torch.ones(c.shape[0], dtype=torch.bool, device=device)
        rest[slots] = False
        assert torch.equal(c[rest], before[rest])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [4, 6])          # G = 2, and G = 3 (a head group padded to 4)
@pytest.mark.parametrize("variant", ["plain", "entry"])
def test_attention_o_decode_merged(device, dtype, H, variant, monkeypatch):
    """The attention's split kernel, then one kernel merging each kv head's splits into its rows of the o
    projection (several row runs per kv head, a part tile at the end, sequences of 1-3 splits, the pad row's
    zero-length and one-key rows) equal attention then matmul."""
    from hybridserve.kernels import attention_o as ao_ref
    from hybridserve.kernels import attention_o_triton as ao_tr

    monkeypatch.setattr(attn_tr, "BLOCK_N", 16)
    monkeypatch.setattr(attn_tr, "MIN_SPLIT", 16)
    monkeypatch.setattr(ao_tr, "MERGED_ROWS", 8)
    monkeypatch.setattr(ao_tr, "MERGED_PER_SM", 8)
    monkeypatch.setattr(ao_tr, "MERGED_CHUNK", 2)         # 3 splits: two merge steps
    Hkv, D, page, N = 2, 16, 4, 44
    ctx = [1, 7, 37, 12, 0 if variant == "plain" else 1]
    k_cache, v_cache, bt = paged_setup(ctx, H, Hkv, D, page, dtype, device)
    seq_lens = torch.tensor(ctx, dtype=torch.int32, device=device)
    B = len(ctx)
    q = torch.randn(B, H, D, device=device).to(dtype)
    o_w = (torch.randn(N, H * D, device=device) / (H * D) ** 0.5).to(dtype)
    entry = None
    if variant == "entry":
        entry = tuple(torch.randn(B, Hkv, D, device=device).to(dtype) for _ in range(2))
    want = ao_ref.decode_merged(q, k_cache, v_cache, bt, seq_lens, 0.25, o_w, torch.zeros(B, N, device=device), entry)
    got = ao_tr.decode_merged(q, k_cache, v_cache, bt, seq_lens, 0.25, o_w, torch.zeros(B, N, device=device), entry)
    rows = 4 if variant == "plain" else 5        # the plain reference's zero-length row is NaN (no keys)
    assert got.dtype == torch.float32 and rel_err(got[:rows], want[:rows]) < tol(dtype)
    if variant == "plain":
        assert (got[4] == 0).all()


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
@pytest.mark.parametrize("H", [4, 6])          # G = 3: BM·G = 15 rows padded to 16 (SmolLM2-135M has 9/3)
@pytest.mark.parametrize("empty", [False, True])
def test_paged_prefill(device, dtype, H, empty, monkeypatch):
    """Against the reference; with `empty`, sequences of no new token (a batched prefill graph's unused
    sequences) first, between and last, and the query-block map counted 2 sequences per load."""
    monkeypatch.setattr(attn_tr, "BLOCK_N", 16)
    monkeypatch.setattr(attn_tr, "PREFILL_ROWS", 16)
    Hkv, D, page = 2, 16, 4
    qlens = [3, 1, 20, 6]                   # prefix + chunk, decode row, fresh prompt, long prefix
    ctx = [9, 12, 20, 40]
    if empty:
        monkeypatch.setattr(attn_tr, "PREFILL_SEQS", 2)
        qlens, ctx = [0, 3, 1, 0, 0, 20, 6, 0], [0, 9, 12, 0, 0, 20, 40, 0]
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
@pytest.mark.parametrize("early", [True, False])
def test_attn_res_route(device, dtype, n_sources, early, monkeypatch):
    """Both forms: every source after the PDL wait, or the committed ones before it (COMMITTED_EARLY_ROWS)."""
    monkeypatch.setattr(route_tr, "COMMITTED_EARLY_ROWS", 64 if early else 0)
    sources = [torch.randn(4, 40, device=device, dtype=dtype) * (1 + i) for i in range(n_sources)]
    q, w = torch.randn(40, device=device, dtype=dtype), torch.rand(40, device=device, dtype=dtype) + 0.5
    _close(route_tr.route(sources, q, w, 1e-5), route_ref.route(sources, q, w, 1e-5), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gap", [0, 3, 8])
def test_attn_res_route_sources_anywhere(device, dtype, gap):
    """Sources before and after the first one in memory (negative offsets), packed with gaps that leave rows
    off 16-byte alignment (the offsets then go in single elements instead of 16-byte units)."""
    big = torch.randn(5 * (4 * 40 + gap) + 1, device=device, dtype=dtype)
    parts = [big[1 + i * (160 + gap):1 + i * (160 + gap) + 160].view(4, 40) for i in range(5)]
    sources = [parts[3], parts[0], parts[4], parts[1], parts[2]]
    q, w = torch.randn(40, device=device, dtype=dtype), torch.rand(40, device=device, dtype=dtype) + 0.5
    _close(route_tr.route(sources, q, w, 1e-5), route_ref.route(sources, q, w, 1e-5), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_sources", [1, 2, 7])
@pytest.mark.parametrize("early", [True, False])
def test_attn_res_route_add(device, dtype, n_sources, early, monkeypatch):
    """The residual add into the partial (the last source) is stored exactly as the unfused add rounds it,
    and the routing mixes that stored partial; the sources stay untouched; a strided delta. Both forms of
    the kernel (COMMITTED_EARLY_ROWS)."""
    monkeypatch.setattr(route_tr, "COMMITTED_EARLY_ROWS", 64 if early else 0)
    sources = [torch.randn(4, 40, device=device, dtype=dtype) * (1 + i) for i in range(n_sources)]
    before = [s.clone() for s in sources]
    delta = torch.randn(4, 80, device=device, dtype=dtype)[:, 20:60] * 3
    q, w = torch.randn(40, device=device, dtype=dtype), torch.rand(40, device=device, dtype=dtype) + 0.5
    partial, routed = route_tr.route_add(sources, delta, q, w, 1e-5)
    want_partial, want = route_ref.route_add(sources, delta, q, w, 1e-5)
    assert partial.dtype == routed.dtype == dtype
    if dtype == torch.float32 or not INTERPRET:  # the interpreter truncates fp32 -> bf16; compiled rounds
        assert torch.equal(partial, want_partial) and torch.equal(partial, sources[-1] + delta)
    else:
        _close(partial, want_partial, dtype)
    _close(routed, want, dtype)
    assert all(torch.equal(a, b) for a, b in zip(sources, before))


# -- monoid chunked prefill: chunk boundaries, state tiles, both intra-chunk forms ---------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [monoid_tr.PrefillConfig(),
                                 monoid_tr.PrefillConfig(chunk=128, factor_span=-1.),  # pairwise form only
                                 monoid_tr.PrefillConfig(chunk=32, local_bk=16, local_bv=16, scan_rows=4)])
@pytest.mark.parametrize("strong", [False, True])
def test_monoid_prefill_chunks(device, dtype, cfg, strong):
    """Sequences over several chunks and just around their boundaries, with empty and one-token
    sequences between them (chunk keys with no chunk), dk != dv, state split into tiles. Mild gates
    take the factorised intra-chunk form; strong ones (down to log α = −30 per step) the pairwise one."""
    H, dk, dv = 2, 16, 32
    lens = [130, 0, 64, 65, 1, 63, 2]
    slots = torch.tensor([3, 0, 1, 5, 2, 8, 4], device=device)       # slots 6 and 7 stay unaddressed
    pool = torch.randn(9, H, dk, dv, device=device)
    q, k, v, log_a = monoid_inputs(sum(lens), H, dk, dv, dtype, device)
    if strong:
        log_a[::5, :, ::3] = -30.
    else:
        log_a = F.logsigmoid(torch.randn_like(log_a) + 3)
    cu = cu_from(lens, device)
    ref_pool, new_pool = pool.clone(), pool.clone()
    ref = monoid_ref.varlen_prefill(q, k, v, log_a, cu, ref_pool, slots)
    out = monoid_tr.prefill_launch(q, k, v, log_a, cu, new_pool, slots, cfg)
    assert out.dtype == dtype and torch.isfinite(out).all() and rel_err(out, ref) < tol(dtype)
    check_pools(new_pool, ref_pool, pool, slots, 1e-4)


# -- fused decode glue: one-row GEMV with its residual add / norm / SiLU·mul, Spartacus's monoid inputs,
#    RoPE + KV write, NanoHammer's state path ---------------------------------------------------------

from hybridserve.kernels import state_token as state_ref  # noqa: E402
from hybridserve.kernels import state_token_triton as state_tr  # noqa: E402


def check_fused_linears(h, delta, N, dtype):
    """add_norm_linear (fp32 out), add_norm_linear_silu_mul and linear of h [rows, K] (+ delta) into N
    outputs: the Triton functions against the plain ones."""
    device, K = h.device, h.shape[1]
    nw = (torch.rand(K, device=device) + 0.5).to(dtype)
    w = (torch.randn(N, K, device=device) * K ** -0.5).to(dtype)
    gate_up = (torch.randn(2 * N, K, device=device) * K ** -0.5).to(dtype)
    got = fused_tr.add_norm_linear(h, delta, nw, w, 1e-5, out_dtype=torch.float32)
    want = fused_ref.add_norm_linear(h, delta, nw, w, 1e-5, out_dtype=torch.float32)
    assert got[1].dtype == torch.float32 and got[0].dtype == dtype
    for a, b in zip(got, want):
        _close(a, b, dtype)
    for a, b in zip(fused_tr.add_norm_linear_silu_mul(h, delta, nw, gate_up, 1e-5),
                    fused_ref.add_norm_linear_silu_mul(h, delta, nw, gate_up, 1e-5)):
        _close(a, b, dtype)
    _close(fused_tr.linear(h, w), fused_ref.linear(h, w), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3])     # 1–2: the Triton GEMV; more: cuBLAS
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("tiles", [None, (2, 256, 4)])   # one K tile per row / three, a partial last one
def test_fused_linears(device, dtype, rows, with_delta, tiles, monkeypatch):
    monkeypatch.setattr(fused_tr, "GEMV_MAX_ROWS", 2)    # the kernel's multi-row path, off by default
    monkeypatch.setattr(fused_tr, "GEMV_STREAM", False)  # the plain GEMV (the stream has its own test)
    if tiles:
        monkeypatch.setattr(fused_tr, "gemv_config", lambda *shape: tiles)
    K, N = 600, 40                                  # K not a multiple of the GEMV's K block
    h = torch.randn(rows, K, device=device, dtype=dtype)
    delta = torch.randn(rows, K, device=device, dtype=dtype) if with_delta else None
    check_fused_linears(h, delta, N, dtype)


def test_gemv_rows_rule(monkeypatch):
    """One row always runs as the GEMV; two rows only for inputs narrower than GEMV_NARROW_K (the ~100M
    models), and not for a product on a side stream; more rows never."""
    assert fused_tr.gemv_rows(1, 4096) and fused_tr.gemv_rows(2, 576) and fused_tr.gemv_rows(2, 1536)
    assert not fused_tr.gemv_rows(2, 2048) and not fused_tr.gemv_rows(3, 576) and not fused_tr.gemv_rows(8, 64)

    def no_gemv(*args, **kwargs):
        raise AssertionError("the GEMV ran")
    monkeypatch.setattr(fused_tr, "_gemv", no_gemv)
    x, w = torch.randn(2, 64), torch.randn(32, 64)
    assert torch.equal(fused_tr.linear(x, w, side=True), F.linear(x, w))
    with pytest.raises(AssertionError, match="the GEMV ran"):
        fused_tr.linear(x, w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [True, False])
@pytest.mark.parametrize("cfg,N", [((4, 1024, 4, 2, False), 40),   # one K tile, 10 blocks over 8 programs
                                   ((2, 256, 4, 1, False), 41),    # three K tiles, a partial last block
                                   ((8, 128, 4, 4, False), 12),    # more programs than blocks: some stream none
                                   ((4, 256, 4, 2, True), 41),     # runs split by rows: 5-6 rows a program
                                   ((8, 128, 4, 4, True), 12)])    # ... 0-1 rows a program
def test_fused_linears_stream(device, dtype, with_delta, cfg, N, monkeypatch):
    """The streamed one-row GEMV (contiguous block runs per program, next tile loaded ahead) with its
    residual add / norm / SiLU·mul, against the plain functions."""
    monkeypatch.setattr(fused_tr, "GEMV_STREAM", True)
    monkeypatch.setattr(fused_tr, "gemv_stream_config", lambda *shape: cfg)
    K = 600
    h = torch.randn(1, K, device=device, dtype=dtype)
    delta = torch.randn(1, K, device=device, dtype=dtype) if with_delta else None
    check_fused_linears(h, delta, N, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs CUDA, compiled Triton")
@pytest.mark.parametrize("cfg", [None, (4, 1024, 4, 8, False), (4, 2048, 8, 4, True), (2, 1024, 4, 8, True)])
@pytest.mark.parametrize("K,N", [(3072, 3072), (8192, 3072), (3072, 8192), (2048, 5000)])
def test_fused_linears_stream_full_size(cfg, K, N, monkeypatch):
    """The streamed GEMV at full-size shapes, bf16: its general setting (None), the after-block one and runs
    split by rows (fused_triton.GEMV_STREAM_SHAPES); `linear(after_block=True)` too."""
    monkeypatch.setattr(fused_tr, "GEMV_STREAM", True)
    if cfg:
        monkeypatch.setattr(fused_tr, "GEMV_STREAM_SHAPES", {(N, K, 1): cfg, (N, K, 2): (2,) + cfg[1:]})
    h = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(N, K, device="cuda") * K ** -0.5).to(torch.bfloat16)
    _close(fused_tr.linear(h, w, after_block=True), fused_ref.linear(h, w), torch.bfloat16)
    check_fused_linears(h, torch.randn_like(h), N, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,warps", [(8, 4), (4, 2)])
@pytest.mark.parametrize("K,N", [(64, 40), (150, 8), (256, 17)])   # 1 / 3 (partial) / 4 K tiles; partial rows
def test_resident_linear(device, dtype, rows, warps, K, N, monkeypatch):
    """The one-row GEMV that holds its weight in registers before its input exists (`linear(after_block=True)`
    with RESIDENT_AFTER_BLOCK) against F.linear; two rows and the knob off take the usual path."""
    monkeypatch.setattr(fused_tr, "RESIDENT_AFTER_BLOCK", True)
    monkeypatch.setattr(fused_tr, "RESIDENT_BK", 64)
    monkeypatch.setattr(fused_tr, "RESIDENT_ROWS", rows)
    monkeypatch.setattr(fused_tr, "RESIDENT_WARPS", warps)
    x = torch.randn(1, K, device=device, dtype=dtype)
    w = (torch.randn(N, K, device=device) * K ** -0.5).to(dtype)
    want = F.linear(x.float(), w.float())
    # on CPU the dispatch keeps the usual path (the resident GEMV is for GPUs): call it directly there
    got = fused_tr.linear(x, w, after_block=True) if x.is_cuda else fused_tr._gemv_resident(x, w)
    assert got.shape == (1, N) and got.dtype == dtype
    assert rel_err(got.float(), want) < tol(dtype)
    assert fused_tr.resident_applies(x, w) == x.is_cuda
    assert not fused_tr.resident_applies(torch.cat([x, x]), w)
    two = fused_tr.linear(torch.cat([x, x]), w, after_block=True)
    assert rel_err(two.float(), F.linear(torch.cat([x, x]).float(), w.float())) < tol(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_rows(device, dtype):
    """A table's rows at ids (repeats, the last row, a column count that is not a power of two, an empty id
    list) and a [2, L, R] stack's rows of both tables, as the reference's index_select."""
    table = torch.randn(20, 300, device=device, dtype=dtype)
    stack = torch.randn(2, 20, 24, device=device, dtype=dtype)
    for ids in ([19, 0, 19, 5], [], [7]):
        ids = torch.tensor(ids, dtype=torch.long, device=device)
        for t in (table, stack):
            got = fused_tr.gather_rows(t, ids)
            assert got.shape == fused_ref.gather_rows(t, ids).shape
            assert torch.equal(got, fused_ref.gather_rows(t, ids))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cfg", [(3, (16, 16, 128, 4, 3)), (40, (16, 32, 64, 4, 2)), (17, (32, 16, 64, 4, 3))])
def test_fused_linears_multi_row(device, dtype, rows, cfg, monkeypatch):
    """The multi-row GEMM (row blocks, a partial last K tile and column block) with its SiLU·mul and fp32
    epilogues, against the plain matmuls; a strided input. (fp32 models keep cuBLAS: same check.)"""
    monkeypatch.setattr(fused_tr, "mm_config", lambda *shape: cfg)
    K, N = 200, 40
    h = torch.randn(rows, 2 * K, device=device, dtype=dtype)[:, K // 2:K // 2 + K]
    delta = torch.randn(rows, K, device=device, dtype=dtype)
    nw = (torch.rand(K, device=device) + 0.5).to(dtype)
    w = (torch.randn(N, K, device=device) * K ** -0.5).to(dtype)
    gate_up = (torch.randn(2 * N, K, device=device) * K ** -0.5).to(dtype)
    got = fused_tr.add_norm_linear(h, delta, nw, w, 1e-5, out_dtype=torch.float32)
    want = fused_ref.add_norm_linear(h, delta, nw, w, 1e-5, out_dtype=torch.float32)
    assert got[1].dtype == torch.float32 and got[1].shape == (rows, N)
    for a, b in zip(got, want):
        _close(a, b, dtype)
    got = fused_tr.add_norm_linear_silu_mul(h, None, nw, gate_up, 1e-5)
    assert got[1].shape == (rows, N)
    for a, b in zip(got, fused_ref.add_norm_linear_silu_mul(h, None, nw, gate_up, 1e-5)):
        _close(a, b, dtype)
    _close(fused_tr.linear(h, w), fused_ref.linear(h, w), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(device, dtype):
    x, r = torch.randn(5, 48, device=device, dtype=dtype), torch.randn(5, 48, device=device, dtype=dtype)
    w = torch.rand(48, device=device, dtype=dtype) + 0.5
    for got, want in zip(fused_tr.add_rms_norm(x, r, w, 1e-5), fused_ref.add_rms_norm(x, r, w, 1e-5)):
        assert got.dtype == dtype
        _close(got, want, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate,full_q,bias", [("sigmoid", False, True), ("neg_softplus", True, False),
                                              ("scalar_sigmoid", False, True), ("sigmoid", True, False)])
def test_fused_monoid_prep(device, dtype, gate, full_q, bias):
    """q/k norms per head or full width, every gate, with and without bias; gate logits up to ±60 so the
    log1p of tiny exp(−|z|) must stay exact; 20 heads span two head blocks when the norms are per head."""
    H, D, T = 20, 16, 3
    W = H * D
    G = H if gate == "scalar_sigmoid" else W
    x = torch.randn(T, 3 * W + G, device=device, dtype=dtype) * 2
    x[:, 3 * W:] *= 20
    q_norm = (torch.rand(W if full_q else D, device=device) + 0.5) * D ** -0.5          # fp32, scale folded in
    k_norm = (torch.rand(D if full_q else W, device=device) + 0.5).to(dtype)
    zb = torch.randn(G, device=device) if bias else None
    got = fused_tr.monoid_prep(x, q_norm, k_norm, zb, H, D, 1e-5, gate)
    want = fused_ref.monoid_prep(x, q_norm, k_norm, zb, H, D, 1e-5, gate)
    for a, b in zip(got[:3], want[:3]):
        assert a.shape == (T, H, D) and a.dtype == dtype
        _close(a, b, dtype)
    assert got[2].data_ptr() == x[:, 2 * W:].data_ptr()                              # v stays a view
    assert got[3].dtype == torch.float32 and got[3].is_contiguous() and (got[3] <= 0).all()
    assert torch.allclose(got[3], want[3], rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate,full_q,bias,bv", [("sigmoid", False, True, 64), ("neg_softplus", True, False, 8),
                                                 ("scalar_sigmoid", False, True, 8), ("sigmoid", True, False, 64)])
def test_monoid_fused_decode(device, dtype, gate, full_q, bias, bv, monkeypatch):
    """The decode step with the prep glue inside it = monoid_prep then decode_step, for every gate and norm
    form; value blocks of 8 split each head's state over two programs; pad rows touch slot 0 only."""
    monkeypatch.setattr(monoid_tr, "DECODE_BV", bv)
    H, D, B = 5, 16, 4
    W = H * D
    G = H if gate == "scalar_sigmoid" else W
    x = torch.randn(B, 3 * W + G, device=device, dtype=dtype) * 2
    x[:, 3 * W:] *= 4
    q_norm = (torch.rand(W if full_q else D, device=device) + 0.5) * D ** -0.5
    k_norm = (torch.rand(D if full_q else W, device=device) + 0.5).to(dtype)
    zb = torch.randn(G, device=device) if bias else None
    pool = torch.randn(NUM_SLOTS + 1, H, D, D, device=device)
    slots = decode_slots(B, device)
    ref_pool, new_pool = pool.clone(), pool.clone()
    args = (x, q_norm, k_norm, zb, H, D, 1e-5, gate)
    ref = monoid_ref.fused_decode(*args, ref_pool, slots)
    out = monoid_tr.fused_decode(*args, new_pool, slots)
    live = live_rows(slots)
    assert out.shape == (B, H, D) and out.dtype == dtype and rel_err(out[live], ref[live]) < tol(dtype)
    # bf16: k is rounded after its norm, where a summation-order ulp flip moves k·vᵀ by 2^-8 relative
    check_pools(new_pool, ref_pool, pool, slots, 1e-5 if dtype == torch.float32 else tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate,bias,add,early", [("sigmoid", True, True, False), ("neg_softplus", False, False, True),
                                                 ("scalar_sigmoid", True, True, True)])
def test_monoid_projection_decode(device, dtype, gate, bias, add, early, monkeypatch):
    """The q|k|v|z GEMV with each head's recurrence run by its last program = add_norm_linear then
    fused_decode: every gate (the per-head one leaves a head 3·d + 1 rows, not a whole number of row blocks),
    with and without the residual add; state read before or after counting in; only the step's slot moves,
    and the arrival counters are zero again after each of two steps."""
    monkeypatch.setattr(monoid_tr, "PROJECTION_FUSED", True)       # an opt-in knob (slower where measured)
    monkeypatch.setattr(monoid_tr, "PROJECTION_EARLY_STATE", early)
    H, D, E = 3, 16, 2048                      # rows of 2048: the streamed GEMV's shapes
    W = H * D
    G = H if gate == "scalar_sigmoid" else W
    weight = (torch.randn(3 * W + G, E, device=device) * E ** -0.5).to(dtype)
    norm_w = (torch.rand(E, device=device) + 0.5).to(dtype)
    q_norm = (torch.rand(D, device=device) + 0.5) * D ** -0.5
    k_norm = (torch.rand(D, device=device) + 0.5).to(dtype)
    zb = torch.randn(G, device=device) if bias else None
    pool = torch.randn(NUM_SLOTS + 1, H, D, D, device=device)
    ref_pool, new_pool = pool.clone(), pool.clone()
    slots = torch.tensor([3], device=device)
    for _ in range(2):
        h = torch.randn(1, E, device=device, dtype=dtype)
        delta = torch.randn(1, E, device=device, dtype=dtype) if add else None
        args = (norm_w, weight, q_norm, k_norm, zb, H, D, 1e-5, gate)
        ref_h, ref = monoid_ref.projection_decode(h, delta, *args, ref_pool, slots)
        if dtype == torch.bfloat16:   # the projection rounded as the Triton GEMV rounds it (the interpreter
            # truncates to bf16), the recurrence by the reference: the state carries any rounding flip forward
            ref_pool.copy_(new_pool)
            ref = monoid_ref.fused_decode(fused_tr.add_norm_linear(h, delta, norm_w, weight, 1e-5)[1], *args[2:],
                                          ref_pool, slots)
        got_h, got = monoid_tr.projection_decode(h, delta, *args, new_pool, slots)
        assert got.shape == (1, H, D) and got.dtype == dtype and rel_err(got, ref) < tol(dtype)
        _close(got_h, ref_h, dtype)
        check_pools(new_pool, ref_pool, pool, slots, 1e-5 if dtype == torch.float32 else tol(dtype))
        assert not fused_tr.arrival_counters(torch.device(device), H)[:H].any()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs CUDA, compiled Triton")
def test_monoid_projection_decode_bitwise(monkeypatch):
    """At Spartacus' shapes the one-kernel step gives the two-kernel step's outputs and states to the bit."""
    monkeypatch.setattr(monoid_tr, "PROJECTION_FUSED", True)
    H, D, E = 32, 64, 2048
    dev, dtype = torch.device("cuda"), torch.bfloat16
    weight = (torch.randn(4 * H * D, E, device=dev) * E ** -0.5).to(dtype)
    norm_w = (torch.rand(E, device=dev) + 0.5).to(dtype)
    q_norm = (torch.rand(D, device=dev) + 0.5) * D ** -0.5
    k_norm = (torch.rand(D, device=dev) + 0.5).to(dtype)
    zb = torch.randn(H * D, device=dev)
    pool = torch.randn(NUM_SLOTS + 1, H, D, D, device=dev)
    two, one = pool.clone(), pool.clone()
    slots = torch.tensor([2], device=dev)
    for _ in range(3):
        h, delta = torch.randn(2, 1, E, device=dev, dtype=dtype)
        args = (norm_w, weight, q_norm, k_norm, zb, H, D, 1e-5, "sigmoid")
        h2, qkvz = fused_tr.add_norm_linear(h, delta, norm_w, weight, 1e-5)
        o2 = monoid_tr.fused_decode(qkvz, *args[2:], two, slots)
        h1, o1 = monoid_tr.projection_decode(h, delta, *args, one, slots)
        assert torch.equal(h1, h2) and torch.equal(o1, o2) and torch.equal(one, two)


def _check_kv_written(caches, ref_caches, slots, dtype):
    """The rows at `slots` of each flattened [pages, page, Hkv, D] cache match the reference; no other moved."""
    written = torch.zeros(caches[0].shape[0] * caches[0].shape[1], dtype=torch.bool, device=caches[0].device)
    written[slots] = True
    for c, r in zip(caches, ref_caches):
        flat, ref_flat = c.flatten(0, 1), r.flatten(0, 1)
        _close(flat[written], ref_flat[written], dtype)
        assert torch.equal(flat[~written], ref_flat[~written])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rot", [16, 8])
def test_fused_rope_write_kv(device, dtype, rot):
    """Packed q|k|v heads of 5 rows, the first 3 cached (the rest are uncached state rows); partial
    rotary dims; cache positions nobody writes stay untouched."""
    T, H, Hkv, D, page = 5, 4, 2, 16, 4
    x = torch.randn(T, H + 2 * Hkv, D, device=device, dtype=dtype)
    ang = torch.rand(T, rot // 2, device=device) * 50
    cos, sin = torch.cat([ang, ang], -1).cos().to(dtype), torch.cat([ang, ang], -1).sin().to(dtype)
    slots = torch.tensor([9, 2, 14], device=device)
    caches = [torch.randn(4, page, Hkv, D, device=device, dtype=dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    got = fused_tr.rope_write_kv(x, cos, sin, H, *caches, slots)
    want = fused_ref.rope_write_kv(x, cos, sin, H, *ref_caches, slots)
    assert got.shape == (T, H + Hkv, D)
    _close(got, want, dtype)
    _check_kv_written(caches, ref_caches, slots, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("add", [True, False])
def test_add_norm_linear_rope_kv(device, dtype, add, monkeypatch):
    """The q|k|v GEMV with RoPE and the KV write in its epilogue (rows in RoPE pairs) = add_norm_linear, then
    rope_write_kv: q rotated, the step's k/v at its slot, every other cache row untouched; under the
    interpreter the rotation is the separate kernel's to the bit given the same projection (compiled, the
    two kernels may contract the rotation's multiply-adds differently)."""
    monkeypatch.setattr(fused_tr, "ROPE_IN_GEMV", True)          # an opt-in knob (slower where measured)
    H, Hkv, D, E, page = 3, 2, 16, 2048, 4      # rows of 2048: the streamed GEMV's shapes
    weight = (torch.randn((H + 2 * Hkv) * D, E, device=device) * E ** -0.5).to(dtype)
    norm_w = (torch.rand(E, device=device) + 0.5).to(dtype)
    h = torch.randn(1, E, device=device, dtype=dtype)
    delta = torch.randn(1, E, device=device, dtype=dtype) if add else None
    ang = torch.rand(1, D // 2, device=device) * 50
    cos, sin = torch.cat([ang, ang], -1).cos().to(dtype), torch.cat([ang, ang], -1).sin().to(dtype)
    slots = torch.tensor([9], device=device)
    caches = [torch.randn(4, page, Hkv, D, device=device, dtype=dtype) for _ in range(2)]
    ref_caches, sep_caches = [c.clone() for c in caches], [c.clone() for c in caches]
    got_h, got = fused_tr.add_norm_linear_rope_kv(h, delta, norm_w, weight, 1e-5, cos, sin, H, *caches, slots)
    want_h, want = fused_ref.add_norm_linear_rope_kv(h, delta, norm_w, weight, 1e-5, cos, sin, H, *ref_caches, slots)
    assert got.shape == (1, H, D) and got.dtype == dtype
    _close(got, want, dtype)
    _close(got_h, want_h, dtype)
    _check_kv_written(caches, ref_caches, slots, dtype)
    qkv = fused_tr.add_norm_linear(h, delta, norm_w, weight, 1e-5)[1]
    sep = fused_tr.rope_write_kv(qkv.view(1, -1, D), cos, sin, H, *sep_caches, slots)
    if INTERPRET:
        assert torch.equal(got, sep[:, :H]) and all(torch.equal(a, b) for a, b in zip(caches, sep_caches))
    else:
        _close(got, sep[:, :H], dtype)
        for a, b in zip(caches, sep_caches):
            _close(a, b, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norms", ["qk", "q", "k"])
@pytest.mark.parametrize("rot", [16, 8])
def test_fused_rope_write_kv_qk_norm(device, dtype, norms, rot):
    """QK-norm (per-head RMSNorm of the q and/or k heads, [D] weights) inside the RoPE + KV write; 12 q
    heads so the 20 packed heads span two head blocks; partial rotary dims; v is never normed."""
    T, H, Hkv, D, page = 4, 12, 4, 16, 4
    x = torch.randn(T, H + 2 * Hkv, D, device=device, dtype=dtype) * 3 + 0.5
    ang = torch.rand(T, rot // 2, device=device) * 50
    cos, sin = torch.cat([ang, ang], -1).cos().to(dtype), torch.cat([ang, ang], -1).sin().to(dtype)
    q_norm = (torch.rand(D, device=device) + 0.5).to(dtype) if "q" in norms else None
    k_norm = (torch.rand(D, device=device) + 0.5).to(dtype) if "k" in norms else None
    slots = torch.tensor([9, 2, 14], device=device)
    caches = [torch.randn(4, page, Hkv, D, device=device, dtype=dtype) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    got = fused_tr.rope_write_kv(x, cos, sin, H, *caches, slots, q_norm, k_norm, 1e-5)
    want = fused_ref.rope_write_kv(x, cos, sin, H, *ref_caches, slots, q_norm, k_norm, 1e-5)
    assert got.shape == (T, H + Hkv, D) and got.dtype == dtype
    _close(got[:, :H], want[:, :H], dtype)
    _close(got[:, H:], want[:, H:], dtype)
    plain = fused_tr.rope_write_kv(x, cos, sin, H, *[c.clone() for c in caches], slots)
    if q_norm is None:                  # a head range without its norm is rotated as without QK-norm
        assert torch.equal(got[:, :H], plain[:, :H])
    if k_norm is None:
        assert torch.equal(got[:, H:], plain[:, H:])
    _check_kv_written(caches, ref_caches, slots, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_state_decode_readout(device, with_bias):
    S = 32
    w = torch.randn(4, S, device=device, dtype=torch.bfloat16)
    bias = torch.randn(S, device=device, dtype=torch.bfloat16) if with_bias else None
    pos = torch.tensor([0, 7, 131071, 65536], device=device)
    slots = decode_slots(4, device)
    pool = torch.randn(NUM_SLOTS, S, device=device)
    theta = state_ref.holo_theta(S, device=device)
    ref_pool, new_pool = pool.clone(), pool.clone()
    got = state_tr.decode_readout(w, pos, theta, new_pool, slots, bias=bias)
    want = state_ref.decode_readout(w, pos, theta, ref_pool, slots, bias=bias)
    if with_bias:   # the bias is the projection's: the same as adding it to w before the readout
        assert rel_err(want, state_ref.decode_readout(w.float() + bias.float(), pos, theta, pool.clone(), slots)) == 0
    live = live_rows(slots)
    assert rel_err(got[live], want[live]) < 1e-5
    check_pools(new_pool, ref_pool, pool, slots, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T", [1, 18])             # the one-row GEMV tiles; several tensor-core row blocks
def test_state_cells(device, dtype, bias, T):
    L, S, I, heads = 3, 32, 48, 4                                # I not a power of two
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)
    s0 = torch.randn(T, S, generator=g).to(device) * 3
    weights = (rnd(L, S, scale=0.1, shift=1), rnd(L, I, S, scale=S ** -0.5), rnd(L, I, scale=0.1) if bias else None,
               rnd(L, S, I, scale=I ** -0.5), rnd(L, S, scale=0.1) if bias else None, rnd(L, heads, scale=0.1, shift=0.5),
               rnd(L, S, scale=0.1, shift=1))
    got = torch.stack(list(state_tr.state_cell_steps(s0, *weights, 1e-5)))
    assert got.shape == (L, T, S) and got.dtype == dtype
    _close(got, torch.stack(list(state_ref.state_cell_steps(s0, *weights, 1e-5))), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("source", ["table", "rows", "rows_no_bias"])
@pytest.mark.parametrize("with_fold", [True, False])
# rows, FOLD_IN_CELL_ROWS: the readout and fold in the cell kernels; the readout on its own, the fold GEMV left to
# the caller or in the cells; several row tiles
@pytest.mark.parametrize("T, fold_rows", [(1, 1), (5, 1), (5, 16), (18, 1)])
def test_state_decode_chain(device, dtype, source, with_fold, T, fold_rows, monkeypatch):
    """A decode step's state chain with the readout inside the first cell kernels and each layer's folded
    GEMV in the kernel that finishes its state equals the reference chain (readout, cells, F.linear): the
    states, the GEMV outputs and the slots written (live rows only: pad rows share slot 0)."""
    L, S, I, R, heads, V = 3, 32, 48, 40, 4, 11
    g = torch.Generator().manual_seed(1)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)
    cells = (rnd(L, S, scale=0.1, shift=1), rnd(L, I, S, scale=S ** -0.5), rnd(L, I, scale=0.1),
             rnd(L, S, I, scale=I ** -0.5), rnd(L, S, scale=0.1), rnd(L, heads, scale=0.1, shift=0.5),
             rnd(L, S, scale=0.1, shift=1))
    fold = rnd(L, R, S, scale=S ** -0.5) if with_fold else None
    slots = (torch.randperm(NUM_SLOTS * 4, generator=g)[:T] + 1 if T > 1 else torch.tensor([3])).to(device)
    if T > 1:
        slots[-2:] = 0                                   # two pad rows
    pool = torch.randn(NUM_SLOTS * 4 + 1, S, generator=g).to(device)
    pos = torch.randint(0, 140000, (T,), generator=g).to(device)
    theta = state_ref.holo_theta(S, device=device)
    if source == "table":
        x, rows, xb = rnd(V, S), torch.randint(0, V, (T,), generator=g).to(device), rnd(S, scale=0.1)
    else:
        x, rows, xb = rnd(2, T, S)[1], None, rnd(S, scale=0.1) if source == "rows" else None   # a strided view
    ref_pool, new_pool = pool.clone(), pool.clone()
    monkeypatch.setattr(state_tr, "FOLD_IN_CELL_ROWS", fold_rows)
    got = list(state_tr.decode_state_chain(x, rows, xb, pos, theta, new_pool, slots, cells, 1e-5, fold))
    want = list(state_ref.decode_state_chain(x, rows, xb, pos, theta, ref_pool, slots, cells, 1e-5, fold))
    assert len(got) == L
    live = slots > 0
    for (s, f), (s_ref, f_ref) in zip(got, want):
        assert s.shape == (T, S) and s.dtype == dtype
        _close(s[live], s_ref[live], dtype)
        if with_fold and T <= fold_rows:
            assert f.shape == (T, R) and f.dtype == dtype
            _close(f[live], f_ref[live], dtype)
        else:      # the kernels leave the GEMV to the caller
            assert f is None and (f_ref is None) == (not with_fold)
    check_pools(new_pool, ref_pool, pool, slots, 1e-6)


def test_token_state_table():
    """The table's rows are token_to_state of each embedding, without the bias."""
    g = torch.Generator().manual_seed(2)
    embed, weight = torch.randn(37, 24, generator=g), torch.randn(8, 24, generator=g)
    table = state_ref.token_state_table(embed, weight, chunk=16)
    assert table.shape == (37, 8) and table.dtype == embed.dtype
    assert rel_err(table, embed @ weight.T) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_state_inputs(device, dtype, bias):
    T, N = 3, 40
    r = torch.randn(2, T, N, device=device, dtype=dtype)[1]          # a strided row view
    rb, w = torch.randn(N, device=device, dtype=dtype), torch.rand(N, device=device, dtype=dtype) + 0.5
    args = (r, rb if bias else None, w, 1e-5)
    got = state_tr.state_inputs(*args)
    assert got.shape == (T, N) and got.dtype == dtype
    _close(got, state_ref.state_inputs(*args), dtype)


def entry_weights(S, N, Hkv, D, bias, dtype, device, seed=0):
    """A layer's state projection (+ bias), input norm weight and k/v rows of qkv at trained-like scale
    (std 0.02 matrices and bias, norm weight ~1)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)
    return (rnd(N, S, scale=0.02), rnd(N, scale=0.02) if bias else None, rnd(N, scale=0.1, shift=1.0),
            rnd(2 * Hkv * D, N, scale=0.02))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("rot", [8, 16])           # partial and full rotary
def test_state_folded_entry(device, dtype, bias, T, rot):
    """The folded entry's epilogue (norm scale from the quadratic form, bias, RoPE on the keys) in one
    kernel equals the reference on the same folded GEMV output."""
    S, N, Hkv, D = 32, 64, 2, 16
    fold, vec = state_ref.fold_entry_weights(*entry_weights(S, N, Hkv, D, bias, dtype, device), dtype)
    assert fold.shape == (2 * Hkv * D + S, S) and fold.dtype == dtype and vec.shape == (2 * Hkv * D + S + 1,)
    s = torch.randn(T, S, device=device).to(dtype)
    u = F.linear(s, fold)
    ang = torch.rand(T, rot // 2, device=device) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    got = state_tr.folded_entry(u, s, vec, cos, sin, Hkv, D, 1e-5)
    want = state_ref.folded_entry(u, s, vec, cos, sin, Hkv, D, 1e-5)
    for a, b in zip(got, want):
        assert a.shape == (T, Hkv, D) and a.dtype == dtype and a.is_contiguous()
        _close(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_folded_entry_equals_unfolded_chain(dtype, bias):
    """One GEMV against [W_kv·diag(w)·W_p; W_pᵀW_p/N] and the epilogue equal projection → RMSNorm → k/v
    projection → RoPE (the reference ops, model dtype), and are no further than that chain from the exact
    (fp64) value: in bf16 each rounds its own intermediates, the fold fewer of them."""
    T, S, N, Hkv, D, rot, eps = 7, 128, 256, 2, 32, 16, 1e-5
    weights = entry_weights(S, N, Hkv, D, bias, dtype, "cpu", seed=1)
    proj, proj_bias, norm_w, w_kv = weights
    s = torch.randn(T, S).to(dtype)                                      # RMS ~1, as the cells' output
    ang = torch.rand(T, rot // 2) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)

    def chain(s, proj, proj_bias, norm_w, w_kv, cos, sin):
        x = state_ref.state_inputs(F.linear(s, proj), proj_bias, norm_w, eps)
        k, v = F.linear(x, w_kv).view(T, 2, Hkv, D).unbind(1)
        return fused_ref.rope(k, cos, sin), v

    unfolded = chain(s, *weights, cos, sin)
    exact = chain(s.double(), *(None if w is None else w.double() for w in weights), cos.double(), sin.double())
    fold, vec = state_ref.fold_entry_weights(*weights, dtype)
    folded = state_ref.folded_entry(F.linear(s, fold), s, vec, cos, sin, Hkv, D, eps)
    for a, b, x in zip(folded, unfolded, exact):
        assert a.dtype == dtype
        _close(a, b, dtype)
        if dtype == torch.bfloat16:
            assert rel_err(a, x) < 1.2 * rel_err(b, x), (rel_err(a, x), rel_err(b, x))
        else:
            assert rel_err(a, x) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_entry(device, dtype):
    """Strided q / state k, v (views of a stacked projection, as the model passes them); a row with no
    tokens (lse = −inf) takes the state value alone."""
    T, H, Hkv, D = 4, 8, 2, 16
    qk = torch.randn(2 * T, H + Hkv, D, device=device, dtype=dtype)
    v_s = torch.randn(T, 3, Hkv, D, device=device, dtype=dtype)[:, 1]
    o_c = torch.randn(T, H, D, device=device, dtype=dtype)
    lse = torch.randn(T, H, device=device)
    lse[1] = float("-inf")
    args = (o_c, lse, qk[:T, :H], qk[T:, H:], v_s, D ** -0.5)
    got = attn_tr.merge_entry(*args)
    _close(got, attn_ref.merge_entry(*args), dtype)
    _close(got[1], v_s[1].repeat_interleave(H // Hkv, dim=0), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs CUDA, compiled Triton")
def test_state_path_replays_in_cuda_graph():
    """The NanoHammer state kernels captured once and replayed on new inputs equal an eager run."""
    dev, dt = "cuda", torch.bfloat16
    L, B, S, I, heads = 3, 4, 64, 96, 4
    slots = decode_slots(B, dev)
    w = torch.randn(B, S, device=dev, dtype=dt)
    pos = torch.tensor([3, 0, 9000, 17], device=dev)
    theta = state_ref.holo_theta(S, device=dev)
    pool = torch.randn(NUM_SLOTS, S, device=dev)
    cells = (torch.rand(L, S, device=dev, dtype=dt) + 0.5, torch.randn(L, I, S, device=dev, dtype=dt) * S ** -0.5,
             None, torch.randn(L, S, I, device=dev, dtype=dt) * I ** -0.5, torch.randn(L, S, device=dev, dtype=dt),
             torch.rand(L, heads, device=dev, dtype=dt), torch.rand(L, S, device=dev, dtype=dt) + 0.5)

    def step():
        s = list(state_tr.state_cell_steps(state_tr.decode_readout(w, pos, theta, pool, slots), *cells, 1e-5))
        return torch.cat([s[0], s[1], state_tr.state_inputs(s[2], cells[4][0], cells[0][0], 1e-5)])

    saved = pool.clone()
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    pool.copy_(saved)
    w.copy_(torch.randn_like(w))
    pos.copy_(torch.tensor([5, 0, 131000, 2], device=dev))
    graph.replay()
    torch.cuda.synchronize()
    got, got_pool = out.clone(), pool.clone()
    pool.copy_(saved)
    assert torch.equal(got, step()) and torch.equal(got_pool, pool)


# -- Llama / Kotodama engine forward wired to the Triton kernels ---------------------------------

class _KernelLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Names of the kernels a step launches, in order: Triton launches, and the aten ops that write memory
    (in place, or a result not aliasing an input: no views, no-op casts, reshapes of contiguous tensors;
    no bare allocations). What runs inside a Triton launch (the interpreter's own copies) is not counted."""

    FREE = frozenset({"empty", "empty_like", "empty_strided", "detach_", "lift_fresh", "_local_scalar_dense"})

    def __init__(self, launcher, monkeypatch):
        super().__init__()
        self.names, self.inside = [], 0
        launch = launcher.run

        def run(kernel, *args, **kwargs):
            self.names.append(kernel.fn.__name__)
            self.inside += 1
            try:
                return launch(kernel, *args, **kwargs)
            finally:
                self.inside -= 1
        monkeypatch.setattr(launcher, "run", run)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.inside and name not in self.FREE:
            def storages(tree):
                return [t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves(tree)
                        if isinstance(t, torch.Tensor)]
            inputs = set(storages((args, kwargs)))
            if name.endswith("_") or any(o not in inputs for o in storages(out)):
                self.names.append("aten." + name)
        return out


# Rows of 2048 (the streamed GEMV and its RoPE epilogue, ~50 s under the interpreter) with the separate
# attention kernels only: the attention variants do not depend on the rows and are covered at 16.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attn,kotodama,hidden", [(a, k, 16) for a in ("separate", "one_kernel") for k in (False, True)]
                         + [("separate", False, 2048), ("attn_o", False, 16), ("merge_o", False, 16)])
def test_llama_engine_on_triton_kernels(device, kotodama, hidden, attn, monkeypatch):
    """LlamaModel.forward with every kernel family on its Triton file (on CPU under the interpreter), fp32,
    against reference_forward: a mixed prefill of 3 sequences (one a 1-token prompt), decode steps at
    batch 3, then at batch 1. The batch-1 decode step launches per layer: the qkv GEMV (norm fused; with
    rows of 2048, the streamed GEMV's shapes, RoPE + KV write in its epilogue), the attention (QK-norm +
    RoPE + KV write inside if ATTN_STEP_FUSED, else a kernel before it unless the GEMV took them; its splits
    merged inside when FUSED_MERGE is on, else by a merge kernel), o GEMV, gate/up GEMV with SiLU·mul, down
    GEMV, and with AttnRes a route_add before each of the two sublayers' GEMVs. With ATTN_O (attn "attn_o") a
    batch-1 layer is the qkv GEMV, one kernel through the o projection, and the two MLP GEMVs; with ATTN_MERGE_O
    ("merge_o") the split merge and the o GEMV are one kernel."""
    import importlib
    from itertools import pairwise

    from harness import Harness, assert_close, reference_logits
    from hybridserve.kernels import backend
    from hybridserve.models import layers, llama
    monkeypatch.setattr(layers, "ATTN_STEP_FUSED", attn == "one_kernel")
    monkeypatch.setattr(layers, "ATTN_O", attn == "attn_o")
    monkeypatch.setattr(layers, "ATTN_MERGE_O", attn == "merge_o")
    monkeypatch.setattr(attn_tr, "FUSED_MERGE", attn == "one_kernel")
    if hidden >= 2048 and device == "cuda":
        pytest.skip("TF32 attention dots at rows of 2048 drift past the fp32 tolerance (1.1e-2, with or without the "
                    "epilogue); on the GPU the epilogue is checked by test_add_norm_linear_rope_kv")
    monkeypatch.setattr(fused_tr, "ROPE_IN_GEMV", hidden >= 2048)   # the opt-in epilogue, where rows allow it
    from test_llama_engine import tiny_weights
    c = llama.LlamaConfig(vocab_size=16, hidden_size=hidden, intermediate_size=16, num_layers=3 if kotodama else 2,
                          num_heads=2, num_kv_heads=1, head_dim=16, qk_norm=kotodama, attn_res=kotodama,
                          attn_res_boundaries=[0, 1] if kotodama else [])   # layer 2: a route_add, no commit
    model = llama.LlamaModel(c, tiny_weights(c), torch.float32, device)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(16, (n,), generator=g).tolist() for n in (5, 1, 7)]
    conts = [torch.randint(16, (4,), generator=g).tolist() for _ in prompts]
    refs = [reference_logits(model, p + q) for p, q in zip(prompts, conts)]
    # every pick() of the engine path (model and shared layers) takes the Triton file
    monkeypatch.setattr(backend, "_load", lambda name, _: importlib.import_module(f"hybridserve.kernels.{name}_triton"))
    h = Harness(model)
    seqs = [h.new_seq() for _ in prompts]
    got = [[o] for o in h.step(list(zip(seqs, prompts)))]
    for j in range(2):
        for b, o in enumerate(h.step([(s, [q[j]]) for s, q in zip(seqs, conts)])):
            got[b].append(o)
    got[0].append(h.step([(seqs[0], [conts[0][2]])])[0])
    with _KernelLog(type(fused_tr._rope_write_kv_kernel), monkeypatch) as log:
        got[0].append(h.step([(seqs[0], [conts[0][3]])])[0])
    tolerance = 1e-4 if INTERPRET else 3e-3        # TF32 attention dots on the GPU
    assert_close(torch.cat(got[0]), refs[0], tolerance)
    for b in (1, 2):
        assert_close(torch.cat(got[b]), refs[b][:len(prompts[b]) + 2], tolerance)
    layer_starts = [i for i, n in enumerate(log.names) if n == ("_attn_o_kernel" if layers.ATTN_O else "_split_kernel")]
    assert len(layer_starts) == c.num_layers, log.names
    per_layer = {b - a for a, b in pairwise(layer_starts)}
    if layers.ATTN_O:
        assert per_layer == {4} and "_split_kernel" not in log.names, str(log.names)
        return
    if layers.ATTN_MERGE_O:
        assert per_layer == {6} and "_merge_kernel" not in log.names, str(log.names)
        assert log.names.count("_merge_o_kernel") == c.num_layers, str(log.names)
        return
    in_gemv = hidden >= 2048 and not layers.ATTN_STEP_FUSED and fused_tr.ROPE_IN_GEMV
    expect = 5 + (not layers.ATTN_STEP_FUSED and not in_gemv) + (not attn_tr.FUSED_MERGE) + (2 if kotodama else 0)
    assert per_layer == {expect}, str(log.names)
    assert ("_rope_write_kv_kernel" in log.names) == (not layers.ATTN_STEP_FUSED and not in_gemv)
    assert ("_gemv_rope_kv_kernel" in log.names) == in_gemv


# -- token selection (kernels/sampling*.py) ---------------------------------------------------------------

from hybridserve.kernels import sampling as sampling_ref  # noqa: E402
from hybridserve.kernels import sampling_triton as sampling_tr  # noqa: E402


@pytest.mark.parametrize("device", DEVICES)
def test_split_argmax_is_torch_argmax(device):
    """Rows longer than a block, a partial last block, ties within a block and across blocks (the lowest
    index wins, as torch.argmax), -inf entries and a row that is all -inf but one."""
    V = sampling_tr.BLOCK * 2 + 333
    x = torch.randn(5, V, device=device)
    x[1, [7, 5000, V - 1]] = 9.0                      # three equal maxima, in three blocks
    x[2, [4100, 4101]] = 9.0                          # a tie inside one block
    x[3, :] = float("-inf")
    x[3, V - 2] = -3.0
    x[4, : V // 2] = float("-inf")
    got = sampling_tr.argmax(x)
    assert got.dtype == torch.long and torch.equal(got, sampling_ref.argmax(x))
    assert got[1].item() == 7 and got[2].item() == 4100


@pytest.mark.parametrize("device", DEVICES)
def test_race_draws_softmax_of_scaled_logits(device):
    """Many rows with the same logits and one seed are independent draws: their frequencies follow
    softmax(logits · scale) (both kernels), masked (-inf) tokens never win, and a seed repeats its draws."""
    V, rows = 12, (20000 if device == "cuda" else 300)      # the interpreter runs a program at a time
    bound = 0.02 if device == "cuda" else 0.15                  # ~3x the expected total variation
    base = torch.randn(V) * 1.5
    base[[3, 8]] = float("-inf")
    scale = torch.full((rows,), 1 / 0.7)
    want = torch.softmax(base / 0.7, -1)
    for mod in (sampling_tr, sampling_ref):
        seed = torch.tensor([1234], device=device)
        x = base.expand(rows, V).contiguous().to(device)
        ids = mod.race(x, scale.to(device), seed)
        freq = torch.bincount(ids.cpu(), minlength=V).float() / rows
        assert freq[3] == 0 and freq[8] == 0
        assert 0.5 * (freq - want).abs().sum().item() < bound, (mod.__name__, freq, want)
        assert torch.equal(ids, mod.race(x, scale.to(device), seed))
        assert not torch.equal(ids, mod.race(x, scale.to(device), seed + 1))


@pytest.mark.parametrize("device", DEVICES)
def test_race_truncated_draws_the_truncated_softmax(device, monkeypatch):
    """race_truncated (a first race, kept where the min_p / top_k / top_p cut keeps its winner, else the top_p
    floor searched and a second race) draws from the truncated softmax of the scaled logits, as the reference
    (floor, then race): per knob group, no draw outside the kept set and frequencies within ~3x the expected
    total variation; top_p 1e-6 (nearly every first draw refused) gives the top token. Without top_k the first
    race runs over the whole row, with it over the top_k cut. A seed repeats."""
    if device == "cpu":     # the interpreter runs a program at a time: small blocks
        monkeypatch.setattr(sampling_tr, "SEARCH_BLOCK", 64)
        monkeypatch.setattr(sampling_tr, "SEARCH_SUB", 64)
        monkeypatch.setattr(sampling_tr, "BLOCK", 64)
        monkeypatch.setattr(sampling_tr, "ACCEPT_SEARCH_BLOCK", 64)
    V = 12
    rows = 4000 if device == "cuda" else 40
    bound = 0.035 if device == "cuda" else 0.3
    base = torch.randn(V) * 1.5
    base[[3, 8]] = float("-inf")
    # (min_p, top_k, top_p, scale) per group of rows; the first call without top_k, the second with it
    without_k = [(0.0, V, 0.7, 1 / 0.7), (0.1, V, 0.95, 1.0), (0.0, V, 1e-6, 2.0)]
    with_k = [(0.05, 3, 0.9, 1.0)]
    if device == "cuda":
        without_k.append((0.0, V, 1.0, 1.0))
        with_k += [(0.0, 5, 1.0, 0.8), (0.0, 4, 0.6, 1.5)]
    for k_on, groups in ((False, without_k), (True, with_k)):
        x = base.expand(rows * len(groups), V).contiguous().to(device)

        def knob(i, dtype=torch.float32):
            return torch.tensor([g[i] for g in groups], dtype=dtype).repeat_interleave(rows).to(device)
        min_p, top_k, top_p, scale = knob(0), knob(1, torch.long), knob(2), knob(3)
        for mod in (sampling_tr, sampling_ref):
            seed = torch.tensor([99], device=device)
            ids = mod.race_truncated(x, scale, min_p, top_k if k_on else None, top_p, seed)
            if not k_on:
                assert torch.equal(ids, mod.race_truncated(x, scale, min_p, None, top_p, seed))
                if device == "cuda":
                    assert not torch.equal(ids, mod.race_truncated(x, scale, min_p, None, top_p, seed + 1))
            for g, (mp, k, p, sc) in enumerate(groups):
                xs = (base * sc)[None]
                floor = sampling_ref.truncation_floor(xs, torch.tensor([mp]), torch.tensor([k]), torch.tensor([p]))
                want = torch.softmax(xs.masked_fill(xs < floor[:, None], float("-inf")), -1)[0]
                freq = torch.bincount(ids[g * rows:(g + 1) * rows].cpu(), minlength=V).float() / rows
                assert freq[want == 0].sum() == 0, (mod.__name__, groups[g], freq, want)
                assert 0.5 * (freq - want).abs().sum().item() < bound, (mod.__name__, groups[g], freq, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k_on", [False, True])
def test_race_truncated_keeps_to_the_cut_on_long_rows(device, k_on, monkeypatch):
    """Over rows of several blocks (the first draw's check sums block by block, the second race reads other
    noise), with rows of every spread and knob mix, each draw of several seeds is a token the sorted
    reference's floor keeps. The refused rows' top_p search runs on blocks half the row stats' size."""
    if device == "cpu":
        monkeypatch.setattr(sampling_tr, "SEARCH_BLOCK", 256)
        monkeypatch.setattr(sampling_tr, "SEARCH_SUB", 64)
        monkeypatch.setattr(sampling_tr, "BLOCK", 256)
    monkeypatch.setattr(sampling_tr, "ACCEPT_SEARCH_BLOCK", (sampling_tr.SEARCH_BLOCK or 1024) // 2)
    V = (sampling_tr.SEARCH_BLOCK or 1024) * 3 + 77
    g = torch.Generator().manual_seed(3)
    knobs = [(0.0, V, 0.9), (0.1, 40, 1.0), (0.0, V, 0.5), (0.3, 100, 0.95), (0.0, 7, 1e-6), (0.05, V, 0.8),
             (0.0, 2, 0.99), (0.0, 500, 0.2)]
    if not k_on:
        knobs = [(mp, V, p) for mp, _, p in knobs]
    B = len(knobs)
    spread = torch.tensor([0.5, 2.0, 4.0, 1.0, 0.5, 8.0, 0.01, 1.0])
    x = (torch.randn(B, V, generator=g) * spread[:, None]).to(device)
    x[3, 100:200] = float("-inf")
    min_p = torch.tensor([k[0] for k in knobs], device=device)
    top_k = torch.tensor([k[1] for k in knobs], device=device)
    top_p = torch.tensor([k[2] for k in knobs], device=device)
    scale = torch.tensor([1.0, 0.8, 1.5, 1.0, 1.0, 0.5, 1.0, 2.0], device=device)
    floor = sampling_ref.truncation_floor(x * scale[:, None], min_p, top_k, top_p)
    rows = torch.arange(B, device=device)
    for s in range(6 if device == "cuda" else 2):
        ids = sampling_tr.race_truncated(x, scale, min_p, top_k if k_on else None, top_p,
                                         torch.tensor([s], device=device))
        assert ((x * scale[:, None])[rows, ids] >= floor).all(), (s, ids)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs CUDA, compiled Triton")
@pytest.mark.parametrize("passes", [4, 6])
@pytest.mark.parametrize("bound", [True, False])
def test_top_k_search_exact_at_full_vocabulary(passes, bound, monkeypatch):
    """At NeoLLM's vocabulary and 128 rows, the compiled top_k search finds the sort's k-th value in every row, with
    the default passes and more, with and without its bound (K_GROUP). Each pass narrows the range by candidate
    keys that the pass before computed in other code; they must agree to the bit (once they did not on the GPU: a
    contracted multiply-add, and 2 rows of 960 kept their k + 1-th token, 8 % of rows with 6 passes)."""
    monkeypatch.setattr(sampling_tr, "SEARCH_PASSES", passes)
    if not bound:
        monkeypatch.setattr(sampling_tr, "K_GROUP", 0)
    g = torch.Generator(device="cuda")
    B, V = 128, 151665
    k, min_p, top_p = (torch.full((B,), 50, device="cuda"), torch.zeros(B, device="cuda"),
                       torch.ones(B, device="cuda"))
    for seed in range(3):
        g.manual_seed(seed)
        x = torch.randn(B, V, device="cuda", generator=g) * 1.25
        got = sampling_tr.truncation_floor(x, min_p, k, top_p)
        assert torch.equal(got, x.topk(50, dim=-1).values[:, -1]), (seed, (got != x.topk(50).values[:, -1]).sum())


# test_search_truncation_floor_keeps_what_the_sort_keeps's layouts: the search's knobs each sets
_ONE_PASS = {"SEARCH_PASSES": 1, "FINISH_TILE": 128}
SEARCH_LAYOUTS = {"default": {}, "overflow": {"SEARCH_GATHER": 1}, "one_pass": _ONE_PASS,
                  "many_passes": {"SEARCH_PASSES": 7},
                  "three_passes_small_buffer": {"SEARCH_PASSES": 3, "SEARCH_GATHER": 64},
                  "bounded": {"K_GROUP": 16}, "bounded_overflow": {"K_GROUP": 16, "SEARCH_GATHER": 8},
                  "bounded_one_pass": {"K_GROUP": 16, **_ONE_PASS}, "unbounded": {"K_GROUP": 0}}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_k,layout", [(True, "default"), (False, "default"), (True, "overflow"),
                                           (True, "one_pass"), (False, "three_passes_small_buffer"),
                                           (False, "many_passes"), (True, "bounded"), (True, "bounded_overflow"),
                                           (True, "bounded_one_pass"), (True, "unbounded")])
def test_search_truncation_floor_keeps_what_the_sort_keeps(device, with_k, layout, monkeypatch):
    """The sort-free truncation floor (key-range search) keeps the same tokens as the sorted reference, per
    row, with every knob mix across rows: neutral, min_p, top_k (ties at the k-th value), top_p (incl. 1e-6:
    the top token only), all three; rows of different spreads, -inf (banned) tokens, a partial last block.
    Layouts: the default (at these vocabularies the buffer holds a whole row, so rows move to it after one
    pass); a buffer of one slot (rows stay on the whole row to the end); one pass (the finishing program
    computes Z); three passes with a buffer of 64 (rows move to it at different passes, or never); more passes
    than most rows need (passes after a row's range is one key wide). The top_k search's bound (K_GROUP) on
    groups of 16, so that most top_k rows have one and gather at step 0: alone, with a buffer of 8 slots (their
    ranges overflow it: they stay on the whole row), with one pass; and without any bound."""

    if device == "cpu":
        monkeypatch.setattr(sampling_tr, "SEARCH_BLOCK", 256)
        monkeypatch.setattr(sampling_tr, "SEARCH_SUB", 64)
    for name, value in SEARCH_LAYOUTS[layout].items():
        monkeypatch.setattr(sampling_tr, name, value)
    V = (sampling_tr.SEARCH_BLOCK or 1024) * 3 + 77                 # 8 rows: 1024-element programs on a GPU
    g = torch.Generator().manual_seed(7)
    knobs = [(0.0, V, 1.0), (0.1, V, 1.0), (0.0, 7, 1.0), (0.0, V, 0.9), (0.0, 40, 0.5), (0.3, 100, 0.95),
             (0.0, V, 1e-6), (0.05, 3, 1.0), (0.0, V, 0.9), (0.0, 50, 0.5), (0.0, V, 0.7), (0.0, 5, 0.8),
             (0.0, V, 0.9)]
    if not with_k:
        knobs = [(mp, V, p) for mp, _, p in knobs]
    B = len(knobs)
    scale = torch.tensor([0.5, 2.0, 4.0, 1.0, 0.5, 2.0, 4.0, 1.0, 0.01, 1.0, 1e-30, 1.0, 1.0])
    x = torch.randn(B, V, generator=g) * scale[:, None]
    x[2, :20] = x[2].max() - 0.25                  # 20 tokens tie right under the top: top_k 7 keeps them all
    x[3, 100:200] = float("-inf")
    # row 8 nearly flat (a wide nucleus); row 9 one value throughout; row 10 both signs within 1e-29 of 0
    # (equal masses, keys far apart); row 11 one finite token among banned ones
    x[9] = 1.5
    x[11] = float("-inf")
    x[11, 5] = 0.25
    # row 12: the search starts at top − R (R = log(V / (1 − top_p)) + 1); the ~0.03 of mass below it still
    # counts in Z, and here decides the cut (the top alone against the top and the 10 tokens at log 0.01)
    x[12] = -(math.log(V / 0.1) + 1.2)
    x[12, 0] = 0.0
    x[12, 1:11] = math.log(0.01)
    x = x.to(device)
    min_p = torch.tensor([k[0] for k in knobs], device=device)
    top_k = torch.tensor([k[1] for k in knobs], device=device)
    top_p = torch.tensor([k[2] for k in knobs], device=device)
    want = sampling_ref.truncation_floor(x, min_p, top_k, top_p)
    got = sampling_tr.truncation_floor(x, min_p, top_k if with_k else None, top_p)
    finite = torch.isfinite(x)
    assert torch.equal((x >= got[:, None]) & finite, (x >= want[:, None]) & finite)
    assert (x >= got[:, None]).sum(-1).min() >= 1
    if with_k:
        assert (x[2, :20] >= got[2]).all()
