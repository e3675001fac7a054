"""Gated DeltaNet: kernels against the token loop, the conv window, and the layer against transformers."""
import pytest
import torch
import torch.nn.functional as F

from hybridserve.kernels import gated_delta, short_conv
from hybridserve.models import gated_deltanet as gdn
from hybridserve.models.batch import BatchMeta


def inputs(T, Hk, dk, Hv, dv, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(T, Hk, dk, generator=g), dim=-1) * dk ** -0.5
    k = F.normalize(torch.randn(T, Hk, dk, generator=g), dim=-1)
    v = torch.randn(T, Hv, dv, generator=g)
    decay = -torch.rand(T, Hv, generator=g) * 0.3   # slow decay: early tokens still matter at T = 200
    beta = torch.rand(T, Hv, generator=g)
    state = torch.randn(Hv, dk, dv, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), decay, beta, state


def close(a, b, tol=1e-4):
    err = (a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)
    assert err < tol, f"max relative error {err:.2e} >= {tol}"


# -- gated delta rule -------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 2, 3, 63, 64, 65, 200])
@pytest.mark.parametrize("r", [1, 2])
def test_chunked_matches_naive(T, r):
    q, k, v, g, beta, s0 = inputs(T, 2, 16, 2 * r, 8, seed=T * 10 + r)
    o_ref, s_ref = gated_delta.naive(q, k, v, g, beta, s0)
    o, s = gated_delta.chunked(q, k, v, g, beta, s0)
    close(o, o_ref)
    close(s, s_ref)
    assert s.dtype == torch.float32


def test_chunked_neollm_dims_and_chunk_sizes():
    q, k, v, g, beta, s0 = inputs(100, 8, 32, 16, 32, seed=3)
    o_ref, s_ref = gated_delta.naive(q, k, v, g, beta, s0)
    for chunk in (16, 64, 128):
        o, s = gated_delta.chunked(q, k, v, g, beta, s0, chunk_size=chunk)
        close(o, o_ref)
        close(s, s_ref)


def test_naive_equals_transformers_recurrence():
    """Our token loop against transformers' own torch recurrence (GVA, l2norm and scaling done by us)."""
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule

    q, k, v, g, beta, s0 = inputs(20, 2, 16, 4, 8, seed=4)
    o_ref, s_ref = gated_delta.naive(q, k, v, g, beta, s0)
    # transformers scales q by dk^-1/2 itself: hand it the unscaled query
    o, s = torch_recurrent_gated_delta_rule(q[None] * 16 ** 0.5, k[None], v[None], g[None], beta[None],
                                            initial_state=s0[None], output_final_state=True)
    close(o[0], o_ref)
    close(s[0], s_ref)


def test_gva_value_head_reads_key_head_j_div_r():
    """Each value head equals a single-head run on key head j // r (catches repeat vs repeat_interleave)."""
    r = 3
    q, k, v, g, beta, s0 = inputs(70, 2, 8, 2 * r, 4, seed=5)
    o_chunk, s_chunk = gated_delta.chunked(q, k, v, g, beta, s0)
    pool = s0.clone()[None].repeat(2, 1, 1, 1)
    o_dec = gated_delta.decode_step(q[:1], k[:1], v[:1], g[:1], beta[:1], pool, torch.tensor([1]))
    for j in range(2 * r):
        kh = j // r
        one = (q[:, kh:kh + 1], k[:, kh:kh + 1], v[:, j:j + 1], g[:, j:j + 1], beta[:, j:j + 1])
        o_j, s_j = gated_delta.naive(*one, s0[j:j + 1])
        close(o_chunk[:, j], o_j[:, 0])
        close(s_chunk[j], s_j[0])
        o1, _ = gated_delta.naive(*(x[:1] for x in one), s0[j:j + 1])
        close(o_dec[0, j], o1[0, 0])


def test_varlen_prefill_and_decode_update_their_slots_only():
    lens = [5, 1, 70]
    T = sum(lens)
    q, k, v, g, beta, _ = inputs(T, 2, 8, 4, 8, seed=6)
    pool = torch.randn(5, 4, 8, 8)
    before = pool.clone()
    slots = torch.tensor([3, 1, 4])
    cu = torch.tensor([0, 5, 6, 76], dtype=torch.int32)
    o = gated_delta.varlen_prefill(q, k, v, g, beta, cu, pool, slots)
    for b, slot in enumerate(slots.tolist()):
        s, e = cu[b].item(), cu[b + 1].item()
        o_ref, s_ref = gated_delta.naive(q[s:e], k[s:e], v[s:e], g[s:e], beta[s:e], before[slot])
        close(o[s:e], o_ref)
        close(pool[slot], s_ref)
    assert torch.equal(pool[[0, 2]], before[[0, 2]])
    # one decode step for slots 4 and 1 plus two pad rows on slot 0
    after_prefill = pool.clone()
    q1, k1, v1, g1, b1, _ = inputs(4, 2, 8, 4, 8, seed=7)
    dec_slots = torch.tensor([4, 0, 1, 0])
    o = gated_delta.decode_step(q1, k1, v1, g1, b1, pool, dec_slots)
    for row, slot in [(0, 4), (2, 1)]:
        o_ref, s_ref = gated_delta.naive(q1[row:row + 1], k1[row:row + 1], v1[row:row + 1], g1[row:row + 1],
                                         b1[row:row + 1], after_prefill[slot])
        close(o[row], o_ref[0])
        close(pool[slot], s_ref)
    assert torch.equal(pool[[2, 3]], after_prefill[[2, 3]])


def test_bf16_inputs_fp32_state():
    q, k, v, g, beta, s0 = inputs(65, 2, 16, 4, 16, seed=8, dtype=torch.bfloat16)
    o_ref, s_ref = gated_delta.naive(q, k, v, g, beta, s0)
    o, s = gated_delta.chunked(q, k, v, g, beta, s0)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    close(o, o_ref, 2e-2)
    close(s, s_ref, 1e-4)


# -- short conv -------------------------------------------------------------------------------------

def conv_inputs(T, C=6, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, C, generator=g), torch.randn(C, K, generator=g)


def test_conv_reference_matches_torch_conv1d():
    x, w = conv_inputs(9)
    want = F.silu(F.conv1d(x.t()[None], w[:, None, :], padding=3, groups=6)[0, :, :9]).t()
    y, window = short_conv.reference(x, w)
    close(y, want, 1e-6)
    assert torch.equal(window, x[-3:].t())


def test_conv_short_inputs_keep_the_older_window():
    x, w = conv_inputs(2)
    init = torch.randn(6, 3)
    y, window = short_conv.reference(x[:1], w, init)
    assert torch.equal(window, torch.cat([init[:, 1:], x[:1].t()], dim=1))
    y2, window2 = short_conv.reference(x[1:2], w, window)
    y_both, window_both = short_conv.reference(x, w, init)
    close(torch.cat([y, y2]), y_both, 1e-6)
    assert torch.equal(window2, window_both)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_conv_chunked_varlen_and_decode_equal_one_pass(chunk):
    x, w = conv_inputs(11, seed=chunk)
    y_ref, win_ref = short_conv.reference(x, w)
    pool = torch.zeros(3, 6, 3)
    pool[2] = 7.0   # another live slot must stay untouched
    got = []
    for s in range(0, 11, chunk):
        piece = x[s:s + chunk]
        if len(piece) == 1:
            got.append(short_conv.decode_step(piece, w, pool, torch.tensor([1])))
        else:
            cu = torch.tensor([0, len(piece)], dtype=torch.int32)
            got.append(short_conv.varlen_prefill(piece, w, cu, pool, torch.tensor([1])))
    close(torch.cat(got), y_ref, 1e-6)
    assert torch.equal(pool[1], win_ref)
    assert torch.all(pool[2] == 7.0)


# -- the layer --------------------------------------------------------------------------------------

DIMS = gdn.GDNDims(hidden_size=64, num_k_heads=2, num_v_heads=4, head_k_dim=16, head_v_dim=16, conv_kernel=4, eps=1e-6)


@pytest.fixture(scope="module")
def hf_layer():
    """transformers' Qwen3NextGatedDeltaNet with random weights everywhere (torch fallback path)."""
    from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    cfg = Qwen3NextConfig(hidden_size=DIMS.hidden_size, linear_num_key_heads=DIMS.num_k_heads,
                          linear_num_value_heads=DIMS.num_v_heads, linear_key_head_dim=DIMS.head_k_dim,
                          linear_value_head_dim=DIMS.head_v_dim, linear_conv_kernel_dim=DIMS.conv_kernel,
                          num_hidden_layers=4, rms_norm_eps=DIMS.eps)
    torch.manual_seed(0)
    layer = Qwen3NextGatedDeltaNet(cfg, 0).eval()
    with torch.no_grad():
        layer.in_proj_qkvz.weight.normal_(0, 64 ** -0.5)
        layer.in_proj_ba.weight.normal_(0, 64 ** -0.5)
        layer.conv1d.weight.normal_(0, 0.5)
        layer.A_log.copy_(torch.empty(4).uniform_(0.02, 1.0).log())
        layer.dt_bias.normal_(-1, 0.5)
        layer.norm.weight.normal_(1, 0.1)
        layer.out_proj.weight.normal_(0, 64 ** -0.5)
    return layer, cfg


def hf_tensors(layer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in layer.named_parameters()}


def separate_via_transformers(layer) -> dict[str, torch.Tensor]:
    """The Qwen3.5 separate layout derived with transformers' own grouped split (independent of ours)."""
    t = hf_tensors(layer)
    q, k, v, z, b, a = layer.fix_query_key_value_ordering(t["in_proj_qkvz.weight"].t()[None],
                                                          t["in_proj_ba.weight"].t()[None])
    rows = [x[0].reshape(DIMS.hidden_size, -1).t() for x in (q, k, v, z)]
    t |= {"in_proj_qkv.weight": torch.cat(rows[:3]), "in_proj_z.weight": rows[3],
          "in_proj_b.weight": b[0].t().contiguous(), "in_proj_a.weight": a[0].t().contiguous()}
    del t["in_proj_qkvz.weight"], t["in_proj_ba.weight"]
    return t


def test_layer_matches_transformers_qwen3_next(hf_layer):
    layer, _ = hf_layer
    x = torch.randn(1, 70, DIMS.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = layer(x)[0]
    w = gdn.load_weights(hf_tensors(layer), "", DIMS, torch.float32, torch.device("cpu"))
    close(gdn.reference(x[0], w, DIMS), want, 1e-4)


def test_grouped_and_separate_layouts_agree_with_qwen3_5(hf_layer):
    """Separate weights in a transformers Qwen3.5 layer reproduce the grouped Qwen3-Next layer, and our
    layer loaded from either layout gives identical outputs."""
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    layer, cfg = hf_layer
    sep = separate_via_transformers(layer)
    cfg35 = Qwen3_5TextConfig(**{k: getattr(cfg, k) for k in (
        "hidden_size", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
        "linear_value_head_dim", "linear_conv_kernel_dim", "num_hidden_layers", "rms_norm_eps")})
    layer35 = Qwen3_5GatedDeltaNet(cfg35, 0).eval()
    layer35.load_state_dict(sep)
    x = torch.randn(1, 33, DIMS.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = layer(x)[0]
        close(layer35(x)[0], want, 1e-5)
    grouped = gdn.load_weights(hf_tensors(layer), "", DIMS, torch.float32, torch.device("cpu"))
    separate = gdn.load_weights(sep, "", DIMS, torch.float32, torch.device("cpu"))
    assert torch.equal(grouped.in_proj, separate.in_proj)
    # and ours split the grouped rows exactly as transformers does
    qkv, z, b, a = gdn.split_grouped(layer.in_proj_qkvz.weight.detach(), layer.in_proj_ba.weight.detach(), DIMS)
    assert torch.equal(qkv, sep["in_proj_qkv.weight"]) and torch.equal(z, sep["in_proj_z.weight"])
    assert torch.equal(b, sep["in_proj_b.weight"]) and torch.equal(a, sep["in_proj_a.weight"])


def meta_for(lens: list[int], slots: list[int], decode: bool) -> BatchMeta:
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
    T = sum(lens)
    zero = torch.zeros(T, dtype=torch.long)
    return BatchMeta(input_ids=zero, positions=zero, cu_seqlens=cu, seq_lens=torch.tensor(lens, dtype=torch.int32),
                     block_tables=torch.zeros(len(lens), 1, dtype=torch.int32), slot_mapping=zero,
                     slot_ids=torch.tensor(slots), logits_indices=torch.arange(T), query_lens_cpu=lens,
                     seq_lens_cpu=lens, is_decode=decode)


@pytest.mark.parametrize("split", [[70], [1, 2, 3, 64], [3, 3, 3, 61], [40] + [1] * 30])
def test_layer_engine_path_continues_across_chunks(hf_layer, split):
    """Chunked prefill and decode from the slots equal one full-sequence pass, chunks < K−1 included."""
    layer, _ = hf_layer
    w = gdn.load_weights(hf_tensors(layer), "", DIMS, torch.float32, torch.device("cpu"))
    x = torch.randn(70, DIMS.hidden_size, generator=torch.Generator().manual_seed(3))
    want = gdn.reference(x, w, DIMS)
    conv_pool = torch.zeros(3, *DIMS.window_shape)
    state_pool = torch.zeros(3, *DIMS.state_shape)
    got, s = [], 0
    for n in split:
        meta = meta_for([n, 1], [2, 0], decode=n == 1)   # a pad row rides along on slot 0
        got.append(gdn.forward(torch.cat([x[s:s + n], x[:1]]), w, DIMS, meta, conv_pool, state_pool)[:n])
        s += n
    close(torch.cat(got), want, 1e-4)
    assert torch.all(conv_pool[1] == 0) and torch.all(state_pool[1] == 0)
