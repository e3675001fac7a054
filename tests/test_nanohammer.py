"""NanoHammer (specs/nanohammer.md §13, tests 1–13): the state path kernels, the per-query state entry, and
the engine path (paged KV + carried integral) against the per-query reference forward."""
import json
import math
import random

import pytest
import torch
from safetensors.torch import save_file

from harness import Harness, assert_close, reference_logits
from hybridserve.engine.model_runner import SeqChunk, build_meta
from hybridserve.kernels import paged_attention, state_token
from hybridserve.kernels.paged_attention import merge_entry
from hybridserve.kernels.state_token import (decode_integral, holo_rope, holo_rope_inv, holo_theta,
                                             integral_reference, state_logit,
                                             varlen_integral)
from hybridserve.models import nanohammer
from hybridserve.models.cache import KVSpec, StateSpec
from hybridserve.models.layers import apply_rope, rope_cos_sin
from hybridserve.models.nanohammer import NanoHammerConfig, NanoHammerModel
from hybridserve.models.registry import build_model
from hybridserve.weights.checkpoint import CheckpointError
from hybridserve.weights.loader import load_checkpoint
from hybridserve.weights.name_map import bind
from hybridserve.weights.nanohammer_map import (nanohammer_rules, resolve_variant, synth_config,
                                               synth_nanohammer)

S = 512


def build(config, tensors, dtype=torch.float32, device="cpu"):
    c = NanoHammerConfig.from_hf(config)
    weights, _ = bind(tensors, nanohammer_rules(config), c.num_layers, config)
    return NanoHammerModel(c, weights, dtype, device)


@pytest.fixture(scope="module")
def checkpoint():
    return synth_nanohammer("tiny", seed=0)


@pytest.fixture(scope="module")
def model(checkpoint):
    return build(*checkpoint)


def prompt(n, seed=1):
    rng = random.Random(seed)
    return [rng.randrange(49152) for _ in range(n)]


def readout(w, positions):
    return holo_rope_inv(integral_reference(holo_rope(w, positions)), positions)


# -- 1. HoloRoPE algebra ------------------------------------------------------------------------------

def test_holo_rope_inverse_and_norm():
    # torch's CPU cos/sin (seen with 2.13) can return fp64 values good to only ~1e-8 from the first call in
    # a process that runs on several threads; later calls are exact. A one-element (single-threaded) call
    # first keeps that away from the 1e-12 checks below.
    torch.zeros(1, dtype=torch.float64).cos(), torch.zeros(1, dtype=torch.float64).sin()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, S, dtype=torch.float64, generator=g)
    pos = torch.randint(0, 131072, (64,), generator=g)
    y = holo_rope(x, pos)
    assert torch.allclose(holo_rope_inv(y, pos), x, atol=1e-12)
    pair_norm = lambda z: z.view(64, S // 2, 2).norm(dim=-1)  # noqa: E731
    assert torch.allclose(pair_norm(y), pair_norm(x), atol=1e-12)


def test_holo_rope_frequencies_and_pair_layout():
    theta = holo_theta(S)
    assert theta.shape == (256,)
    want = torch.tensor([10000.0 ** (-2 * j / 512) for j in range(256)], dtype=torch.float64)
    assert torch.allclose(theta, want, rtol=1e-14, atol=0)
    # pair j = (x_{2j}, x_{2j+1}) is one complex number multiplied by e^{iθ_j t}
    t = 37
    x = torch.zeros(1, S, dtype=torch.float64)
    x[0, 0::2] = 1.0
    y = holo_rope(x, torch.tensor([t]))[0]
    want = torch.tensor([[math.cos(10000.0 ** (-2 * j / 512) * t), math.sin(10000.0 ** (-2 * j / 512) * t)]
                         for j in range(256)], dtype=torch.float64).flatten()
    assert torch.allclose(y, want, atol=1e-12)


def test_integral_readout_is_the_relative_sum_and_shift_invariant():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, S, generator=g)
    pos = torch.arange(40)
    s0 = readout(w, pos)
    for t in [0, 1, 17, 39]:
        direct = holo_rope(w[:t + 1], pos[:t + 1] - t).sum(0)   # Σ_{τ≤t} R(θ(τ−t)) w_τ
        assert torch.allclose(s0[t], direct, atol=1e-4)
    assert torch.allclose(readout(w, pos + 12345), s0, atol=1e-4)


# -- 2. integral kernels --------------------------------------------------------------------------------

def test_varlen_integral_equals_sequential_with_carried_state():
    g = torch.Generator().manual_seed(2)
    lens, slots = [5, 1, 12, 3], [3, 1, 2, 4]
    pool = torch.randn(6, S, generator=g)
    start = pool.clone()
    u = torch.randn(sum(lens), S, generator=g)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    got = varlen_integral(u, cu, pool, torch.tensor(slots))
    for b, (n, slot) in enumerate(zip(lens, slots)):
        want = integral_reference(u[cu[b]:cu[b + 1]], start[slot])
        assert torch.allclose(got[cu[b]:cu[b + 1]], want, atol=1e-5)
        assert torch.allclose(pool[slot], want[-1], atol=1e-5)
    assert torch.equal(pool[[0, 5]], start[[0, 5]])     # slots no sequence owns are untouched


@pytest.mark.parametrize("split", [1, 7, 64, "random"])
def test_chunked_integral_equals_unchunked(split):
    g = torch.Generator().manual_seed(3)
    u = torch.randn(150, S, generator=g)
    whole_pool = torch.zeros(2, S)
    whole = varlen_integral(u, torch.tensor([0, 150], dtype=torch.int32), whole_pool, torch.tensor([1]))
    rng = random.Random(4)
    bounds, i = [0], 0
    while i < 150:
        i = min(150, i + (rng.randrange(1, 40) if split == "random" else split))
        bounds.append(i)
    pool, parts = torch.zeros(2, S), []
    for a, b in zip(bounds, bounds[1:]):
        if b - a == 1:
            parts.append(decode_integral(u[a:b], pool, torch.tensor([1])))
        else:
            parts.append(varlen_integral(u[a:b], torch.tensor([0, b - a], dtype=torch.int32), pool, torch.tensor([1])))
    assert torch.allclose(torch.cat(parts), whole, atol=1e-4)
    assert torch.allclose(pool[1], whole_pool[1], atol=1e-4)
    assert torch.allclose(whole, integral_reference(u), atol=1e-4)


def test_decode_integral_padding_rows_touch_only_the_pad_slot():
    g = torch.Generator().manual_seed(5)
    pool = torch.randn(4, S, generator=g)
    start = pool.clone()
    u = torch.randn(4, S, generator=g)
    got = decode_integral(u, pool, torch.tensor([2, 0, 0, 3]))
    assert torch.allclose(got[0], start[2] + u[0]) and torch.allclose(pool[3], start[3] + u[3])
    assert torch.equal(pool[1], start[1])


# -- 3. causality -----------------------------------------------------------------------------------

def test_causality_prefix_logits_do_not_see_the_future(model):
    p, q = prompt(13, 20), prompt(9, 21)
    whole = reference_logits(model, p + q)
    assert_close(whole[:13], reference_logits(model, p), tol=1e-5)
    h = Harness(model)
    s = h.new_seq()
    assert_close(h.step([(s, p + q)])[0][:13], reference_logits(model, p), tol=1e-5)


# -- 4. LSE merge equals the explicit per-query key set ---------------------------------------------------

def explicit_state_attention(q, k_s, v_s, keys, values, scale):
    """softmax over [state entry] + keys for one query: q [H, D], k_s/v_s [Hkv, D], keys/values [N, Hkv, D]."""
    rep = q.shape[0] // k_s.shape[0]
    k = torch.cat([k_s[None], keys]).repeat_interleave(rep, dim=1)
    v = torch.cat([v_s[None], values]).repeat_interleave(rep, dim=1)
    p = (torch.einsum("hd,nhd->hn", q, k) * scale).softmax(-1)
    return torch.einsum("hn,nhd->hd", p, v)


@pytest.mark.parametrize("decode", [False, True])
def test_lse_merge_equals_explicit_attention(decode):
    g = torch.Generator().manual_seed(6)
    H, Hkv, D, page = 8, 2, 16, 4
    k_cache, v_cache = torch.zeros(32, page, Hkv, D), torch.zeros(32, page, Hkv, D)
    # (cached tokens, new tokens) per sequence
    shapes = [(9, 1), (0, 1), (4, 1)] if decode else [(0, 6), (5, 7), (3, 1)]
    chunks, ctx, next_page = [], [], 1
    for cached, new in shapes:
        n_pages = -(-(cached + new) // page)
        pages = list(range(next_page, next_page + n_pages))
        next_page += n_pages
        k_all, v_all = torch.randn(cached + new, Hkv, D, generator=g), torch.randn(cached + new, Hkv, D, generator=g)
        if cached:
            old = build_meta([SeqChunk([0] * cached, 0, pages, 1, True)], page, "cpu")
            paged_attention.write_kv(k_cache, v_cache, k_all[:cached], v_all[:cached], old.slot_mapping)
        chunks.append(SeqChunk([0] * new, cached, pages, 1, True))
        ctx.append((k_all, v_all, cached))
    meta = build_meta(chunks, page, "cpu")
    assert meta.is_decode == decode
    new_k = torch.cat([k[c:] for k, _, c in ctx])
    new_v = torch.cat([v[c:] for _, v, c in ctx])
    paged_attention.write_kv(k_cache, v_cache, new_k, new_v, meta.slot_mapping)
    T = meta.num_tokens
    q = torch.randn(T, H, D, generator=g)
    k_s, v_s = 2 * torch.randn(T, Hkv, D, generator=g), torch.randn(T, Hkv, D, generator=g)
    o_c, lse = paged_attention.reference(q, k_cache, v_cache, meta, D ** -0.5, return_lse=True)
    got = merge_entry(o_c, lse, q, k_s, v_s, D ** -0.5)
    row = 0
    for k_all, v_all, cached in ctx:
        for t in range(cached, k_all.shape[0]):
            want = explicit_state_attention(q[row], k_s[row], v_s[row], k_all[:t + 1], v_all[:t + 1], D ** -0.5)
            assert torch.allclose(got[row], want, atol=1e-5)
            row += 1


# -- 5–9. engine path against the reference ---------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 3, 16, None])
def test_chunked_prefill_matches_reference_and_final_integral(model, chunk):
    toks = prompt(37)
    h = Harness(model)
    s = h.new_seq()
    chunk = chunk or len(toks)
    got = torch.cat([h.step([(s, toks[i:i + chunk])])[0] for i in range(0, len(toks), chunk)])
    assert_close(got, reference_logits(model, toks))
    whole = Harness(model)
    w = whole.new_seq()
    whole.step([(w, toks)])
    integral = lambda hs, seq: hs.pools.view.states["integral"][0, seq.slot]  # noqa: E731
    assert torch.allclose(integral(h, s), integral(whole, w), rtol=1e-5, atol=1e-4)


def test_prefill_then_decode(model):
    toks = prompt(45, seed=2)
    assert_close(Harness(model).prefill_then_decode(toks, 25), reference_logits(model, toks))


def test_mixed_batch_of_different_lengths(model):
    prompts = [prompt(1, 3), prompt(7, 4), prompt(30, 5), prompt(2, 6)]
    h = Harness(model)
    seqs = [h.new_seq() for _ in prompts]
    got = [[] for _ in prompts]
    for k, o in zip([0, 1, 2, 3], h.step([(seqs[0], prompts[0]), (seqs[1], prompts[1][:4]),
                                           (seqs[2], prompts[2][:10]), (seqs[3], prompts[3][:1])])):
        got[k].append(o)
    # prefill chunks beside decode-style rows
    for k, o in zip([1, 2, 3], h.step([(seqs[1], prompts[1][4:]), (seqs[2], prompts[2][10:29]),
                                        (seqs[3], prompts[3][1:])])):
        got[k].append(o)
    for k, o in zip([2], h.step([(seqs[2], prompts[2][29:])])):
        got[k].append(o)
    for g, p in zip(got, prompts):
        assert_close(torch.cat(g), reference_logits(model, p))


def test_one_token_prompt_alone_batched_and_padded(model):
    toks = prompt(1, 9)
    ref = reference_logits(model, toks)
    h = Harness(model)
    assert_close(h.step([(h.new_seq(), toks)])[0], ref)                       # decode path, I = 0
    assert_close(h.step([(h.new_seq(), toks)], pad_rows=3)[0], ref)
    long = prompt(6, 10)
    a, b = h.new_seq(), h.new_seq()
    out = h.step([(a, long), (b, toks)])                                      # varlen path
    assert_close(out[1], ref)
    assert_close(out[0], reference_logits(model, long))


def test_slot_reused_after_release(model):
    h = Harness(model, num_pages=32, num_slots=1)
    a = h.new_seq()
    h.step([(a, prompt(40, 11))])
    h.release(a)
    toks = prompt(40, 12)
    b = h.new_seq()
    assert b.slot == 1
    assert_close(h.step([(b, toks)])[0], reference_logits(model, toks))


def test_padding_rows_leave_live_state_and_kv_untouched(model):
    h = Harness(model)
    a, b = h.new_seq(), h.new_seq()
    h.step([(a, prompt(10, 13)), (b, prompt(7, 14))])
    states, kv = h.live_state(), [(k[1:].clone(), v[1:].clone()) for k, v in h.pools.view.kv]
    h.step([], pad_rows=4)
    for g, t in h.live_state().items():
        assert torch.equal(t, states[g])
    for (k, v), (k0, v0) in zip(h.pools.view.kv, kv):
        assert torch.equal(k[1:], k0) and torch.equal(v[1:], v0)
    # a live prefill chunk beside pad rows changes only its own slot
    out = h.step([(a, prompt(3, 15))], pad_rows=2)[0]
    assert_close(out, reference_logits(model, prompt(10, 13) + prompt(3, 15))[10:])
    after = h.live_state()["integral"]
    assert torch.equal(after[0, b.slot - 1], states["integral"][0, b.slot - 1])
    assert not torch.equal(after[0, a.slot - 1], states["integral"][0, a.slot - 1])


def test_bf16_engine_matches_fp32_reference(checkpoint):
    """Production dtype: bf16 weights and KV, fp32 integral."""
    model = build(*checkpoint, dtype=torch.bfloat16)
    toks = prompt(30, 22)
    h = Harness(model)
    s = h.new_seq()
    got = [h.step([(s, toks[:20])])[0]] + [h.step([(s, [t])])[0] for t in toks[20:]]
    assert_close(torch.cat(got), reference_logits(build(*checkpoint), toks), tol=2e-2)


# -- 10. nothing extra is cached ------------------------------------------------------------------------

def test_cache_holds_real_tokens_and_the_integral_only(model):
    layout = model.cache_layout()
    assert layout.states == {"integral": StateSpec(1, (S,), torch.float32)}
    assert layout.state_bytes_per_slot(torch.bfloat16) == {"integral": S * 4}
    toks = prompt(11, 16) + prompt(5, 17)
    h = Harness(model)
    s = h.new_seq()
    h.step([(s, toks[:11])])
    for t in toks[11:]:
        h.step([(s, [t])])
    flat = h.pools.view.kv[0][0][s.pages].flatten(0, 1)                     # [pages * page_size, Hkv, D]
    written = flat.abs().sum((1, 2)) != 0
    assert written.tolist() == [True] * 16 + [False] * (flat.shape[0] - 16)
    ids = torch.tensor(toks)
    w = torch.nn.functional.linear(model.embed[ids], *model.token_to_state).float()
    want = integral_reference(holo_rope(w, torch.arange(16)))[-1]
    assert torch.allclose(h.pools.view.states["integral"][0, s.slot], want, atol=1e-4)


def test_full_size_layout_and_parameter_count():
    """The ~1.5B configuration, built on the meta device: shapes and cache layout only."""
    config = synth_config("full")
    tensors = {}
    for rule in nanohammer_rules(config):
        if rule.pattern.startswith(("model.", "lm_head.")):
            layers = range(config["num_hidden_layers"]) if "{i}" in rule.pattern else [0]
            for i in layers:
                tensors[rule.pattern.format(i=i)] = torch.empty(rule.expected_shape(config), device="meta")
    m = build(config, tensors, torch.bfloat16, "meta")
    assert m.cache_layout().kv == KVSpec(16, 8, 64)
    assert m.cache_layout().states == {"integral": StateSpec(1, (512,), torch.float32)}
    assert 1.5e9 < m.weights_bytes() / 2 < 1.6e9


# -- 11. RoPE at distance 0 ---------------------------------------------------------------------------

def test_state_logit_is_position_free(model):
    """q and the state key are rotated at the same position, so the logit equals the un-rotated dot product."""
    g = torch.Generator().manual_seed(7)
    H, Hkv, D = 4, 2, 16
    q, k = torch.randn(6, H, D, generator=g), torch.randn(6, Hkv, D, generator=g)
    pos = torch.tensor([0, 1, 4095, 8192, 65536, 131071])
    cos, sin = rope_cos_sin(pos, model.inv_freq, torch.float32)
    rotated = state_logit(apply_rope(q, cos, sin), apply_rope(k, cos, sin), D ** -0.5)
    assert torch.allclose(rotated, state_logit(q, k, D ** -0.5), atol=1e-4)


# -- 12. backbone isolation ---------------------------------------------------------------------------

def test_backbone_alone_equals_transformers_llama(model, checkpoint, monkeypatch):
    transformers = pytest.importorskip("transformers")
    config, tensors = checkpoint
    hf_config = transformers.LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"], num_key_value_heads=config["num_key_value_heads"],
        head_dim=config["head_dim"], rms_norm_eps=config["rms_norm_eps"],
        max_position_embeddings=config["max_position_embeddings"], tie_word_embeddings=False,
        rope_parameters={"rope_theta": config["rope_theta"], **config["rope_scaling"]})
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    backbone = {k: v for k, v in tensors.items() if "state" not in k}
    hf.load_state_dict(backbone, strict=True)
    toks = prompt(21, 18)
    with torch.inference_mode():
        want = hf(torch.tensor([toks])).logits[0]

    never = lambda q, k_s, scale: torch.full(q.shape[:2], float("-inf"))  # noqa: E731
    monkeypatch.setattr(state_token, "state_logit", never)
    monkeypatch.setattr(nanohammer, "state_logit", never)
    monkeypatch.setattr(paged_attention, "entry_logit", never)   # a decode step's entry, inside attention
    assert_close(reference_logits(model, toks), want, tol=1e-5)
    h = Harness(model)
    s = h.new_seq()
    got = [h.step([(s, toks[:15])])[0]] + [h.step([(s, [t])])[0] for t in toks[15:]]
    assert_close(torch.cat(got), want, tol=1e-5)


# -- 13. long-position numerics -----------------------------------------------------------------------

def test_holo_angles_at_131k_match_fp64():
    pos = torch.tensor([131000, 131071])
    x = torch.zeros(2, S)
    x[:, 0::2] = 1.0
    got = holo_rope(x, pos).view(2, 256, 2)
    theta = holo_theta(S)
    ang = pos.double()[:, None] * theta[None, :]
    assert (got[..., 0].double() - ang.cos()).abs().max() < 1e-6
    assert (got[..., 1].double() - ang.sin()).abs().max() < 1e-6
    # the failure mode this guards against: fp32 angle arithmetic is off by ~1e-2 here
    fp32 = pos.float()[:, None] * theta.float()[None, :]
    assert (fp32.cos().double() - ang.cos()).abs().max() > 1e-3


# -- loading ------------------------------------------------------------------------------------------

def test_checkpoint_dir_loads_through_the_registry(model, checkpoint, tmp_path):
    """config.json need not carry the shape-settled fields: the registry reads them from the tensors."""
    config, tensors = checkpoint
    shape_settled = ("state_intermediate_size", "state_hidden_size", "state_num_heads", "tie_word_embeddings")
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in shape_settled}))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = load_checkpoint(tmp_path, progress=False)
    assert ckpt.arch == "nanohammer"
    loaded = build_model(ckpt, torch.float32, torch.device("cpu"))
    toks = prompt(5, 19)
    assert torch.equal(reference_logits(loaded, toks), reference_logits(model, toks))


def test_name_map_optional_biases_shapes_and_unexpected_tensors(checkpoint):
    config, tensors = checkpoint
    no_bias = {k: v for k, v in tensors.items() if not k.endswith(".bias")}
    weights, report = bind(no_bias, nanohammer_rules(config), config["num_hidden_layers"], config)
    assert report.ok and "token_to_state.weight" in weights and "layers.1.state_cell.alpha" in weights
    build(config, no_bias)
    assert resolve_variant(dict(config, state_intermediate_size=7), tensors) == config
    tied = resolve_variant(config, {k: v for k, v in tensors.items() if k != "lm_head.weight"})
    assert tied["tie_word_embeddings"] is True
    per_layer = dict(tensors, **{"model.layers.0.token_to_state.weight": tensors["model.token_to_state.weight"]})
    with pytest.raises(CheckpointError, match="model.layers.0.token_to_state.weight"):
        bind(per_layer, nanohammer_rules(config), config["num_hidden_layers"], config)
    wide = dict(tensors, **{"model.layers.0.state_cell.mlp.fc1.weight": torch.zeros(128, 1024)})
    with pytest.raises(CheckpointError, match="fc1.weight  expected \\[128, 512\\], found \\[128, 1024\\]"):
        bind(wide, nanohammer_rules(config), config["num_hidden_layers"], resolve_variant(config, wide))
