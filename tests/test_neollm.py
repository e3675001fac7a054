"""NeoLLM: loader variant inference, the forward math against a plain transcription of the spec, and the
engine path (paged KV + GDN state slots) against the reference forward."""
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

from harness import Harness, assert_close, reference_logits
from hybridserve.models import gated_deltanet as gdn
from hybridserve.models.layers import apply_rope, rope_cos_sin, rope_inv_freq
from hybridserve.models.neollm import FULL, NeoLLMConfig, NeoLLMModel, fan, poly_norm
from hybridserve.models.registry import build_model
from hybridserve.weights.checkpoint import Checkpoint, CheckpointError
from hybridserve.weights.neollm_map import bind_neollm, infer_neollm_variant, synth_neollm

VOCAB = 49152


def to_separate_layout(config, tensors):
    """Rewrite a grouped checkpoint's GDN projections in the Qwen3.5 separate layout."""
    c = NeoLLMConfig.from_hf(config)
    out = dict(tensors)
    for i, kind in enumerate(c.layer_types):
        if kind == FULL:
            continue
        p = f"model.layers.{i}.linear_attn."
        parts = gdn.split_grouped(out.pop(p + "in_proj_qkvz.weight"), out.pop(p + "in_proj_ba.weight"), c.gdn_dims)
        out |= {p + f"in_proj_{x}.weight": t.contiguous() for x, t in zip(("qkv", "z", "b", "a"), parts)}
    return out


def build(tensors_config, dtype=torch.float32):
    config, tensors = tensors_config
    full, bound, _ = bind_neollm(tensors, config)
    return NeoLLMModel(NeoLLMConfig.from_hf(full), bound, dtype)


VARIANTS = {
    "gated-fanall-2gpas-grouped": lambda: synth_neollm("tiny", 0, attn_output_gate=True, gpas_gates=2),
    "ungated-fanattn-1gpas-separate": lambda: (lambda c, t: (c, to_separate_layout(c, t)))(
        *synth_neollm("tiny", 1, fan_placement="full_attention")),
}


@pytest.fixture(params=list(VARIANTS), scope="module")
def model(request):
    return build(VARIANTS[request.param]())


def prompt(n, seed=1):
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


# -- loader ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("placement", ["none", "full_attention", "linear_attention", "all"])
def test_variant_inference_from_shapes(gate, placement):
    config, tensors = synth_neollm("tiny", 2, attn_output_gate=gate, fan_placement=placement,
                                   gpas_gates=1 if gate else 2, intermediate_size=96 if gate else 160)
    v = infer_neollm_variant(tensors, config)
    assert v["attn_output_gate"] == gate and v["fan_placement"] == placement
    assert v["intermediate_size"] == (96 if gate else 160) and v["gpas_gates"] == (1 if gate else 2)
    assert v["gdn_layout"] == "grouped" and v["zero_centered_norm"] and v["lns_forward"]
    assert infer_neollm_variant(to_separate_layout(config, tensors), config)["gdn_layout"] == "separate"
    bind_neollm(tensors, config)   # the inferred variant binds every tensor


def test_norm_form_value_check():
    config, tensors = synth_neollm("tiny", 3)
    norms = [n for n in tensors if re.search(r"(layernorm|_norm|model\.norm)\.weight$", n)]
    plain = {**tensors, **{n: tensors[n] + 1 for n in norms}}
    v = infer_neollm_variant(plain, config)
    assert not v["zero_centered_norm"] and v["lns_forward"]
    baked = dict(plain)
    for n in norms:
        m = re.match(r"model\.layers\.(\d+)\.(input|post_attention)_layernorm", n)
        if m:
            baked[n] = plain[n] / math.sqrt(int(m.group(1)) + 1)
    v = infer_neollm_variant(baked, config)
    assert not v["zero_centered_norm"] and not v["lns_forward"]
    # LNS applied exactly once: forward multiply on plain weights == no multiply on baked weights
    ids = torch.tensor(prompt(12))
    assert_close(build((config, baked)).reference_forward(ids), build((config, plain)).reference_forward(ids), 1e-5)


def test_missing_and_unexpected_tensors_are_listed_with_shapes():
    config, tensors = synth_neollm("tiny", 4)
    removed = "model.layers.1.linear_attn.A_log"
    del tensors[removed]
    tensors["model.layers.2.mystery.weight"] = torch.zeros(7, 3)
    with pytest.raises(CheckpointError) as err:
        bind_neollm(tensors, config)
    msg = str(err.value)
    assert "04da2a7b" in msg and "fan_placement=all" in msg
    missing = msg.split("missing (")[1].split("unexpected (")[0]
    unexpected = msg.split("unexpected (")[1]
    assert missing.startswith("1):") and f"{removed}  [4]" in missing
    assert unexpected.startswith("1):") and "model.layers.2.mystery.weight  [7, 3]" in unexpected
    assert "wrong shape" not in msg


def test_full_size_matches_the_spec_parameter_count():
    """The 110M working dims: ungated attention with FAN on all layers is 110.9M (33.23M non-embedding)."""
    config, tensors = synth_neollm("full", 0)
    full, bound, _ = bind_neollm(tensors, config)
    total = sum(t.numel() for t in tensors.values())
    assert (total, total - 151665 * 512) == (110_886_140, 33_233_660)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert full["intermediate_size"] == 1024 and not full["attn_output_gate"] and full["fan_placement"] == "all"
    layout = NeoLLMModel(NeoLLMConfig.from_hf(full), bound, torch.bfloat16).cache_layout()
    assert (layout.kv.num_layers, layout.kv.num_kv_heads, layout.kv.head_dim) == (3, 2, 64)
    assert layout.states["gdn"].shape == (16, 32, 32) and layout.states["gdn"].dtype == torch.float32
    assert layout.states["conv"].shape == (1024, 3) and layout.states["conv"].dtype is None
    assert layout.state_bytes_per_slot(torch.bfloat16) == {"gdn": 9 * 64 * 1024, "conv": 9 * 6 * 1024}


def test_registry_builds_a_non_default_variant():
    config, tensors = synth_neollm("tiny", 5, attn_output_gate=True, fan_placement="linear_attention", gpas_gates=2)
    model = build_model(Checkpoint("neollm", config, to_separate_layout(config, tensors), "synthetic"),
                        torch.float32, torch.device("cpu"))
    assert isinstance(model, NeoLLMModel) and model.config.attn_output_gate
    assert model.config.fan_placement == "linear_attention"


# -- forward math against a plain transcription of neollm.md §5 ---------------------------------

def test_components():
    h = torch.randn(3, 512)
    w, b = torch.randn(448, 512) * 0.05, torch.randn(448)
    out = fan(h, w, b, p=64)
    pg = h @ w.t() + b
    assert out.shape == (3, 512)
    torch.testing.assert_close(out, torch.cat([pg[:, :64].cos(), pg[:, :64].sin(), pg[:, 64:]], -1))
    u = torch.randn(5, 40, dtype=torch.bfloat16)
    pw, pb = torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.1])
    uf = u.double()

    def n(x):
        return x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()

    want = 0.2 * n(uf ** 3) + 0.3 * n(uf ** 2) + 0.5 * n(uf) + 0.1
    torch.testing.assert_close(poly_norm(u, pw, pb).double(), want, atol=2e-2, rtol=1e-2)


def spec_forward(config: NeoLLMConfig, t: dict, ids: torch.Tensor) -> torch.Tensor:
    """neollm.md §5 written out plainly over the canonical tensors (GDN mixer: the transformers-anchored layer)."""
    c = config
    T = len(ids)

    def norm(x, w, lns=1.0):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps) * (1 + w) * lns

    rot = int(c.head_dim * c.partial_rotary_factor)
    cos, sin = rope_cos_sin(torch.arange(T), rope_inv_freq(rot, c.rope_theta), torch.float32)
    x = t["embed_tokens.weight"][ids]
    for i, kind in enumerate(c.layer_types):
        p = f"layers.{i}."
        s = 1 / math.sqrt(i + 1)
        h = norm(x, t[p + "input_layernorm.weight"], s)
        if c.has_fan(i):
            h = fan(h, t[p + "fan.weight"], t[p + "fan.bias"], c.fan_sizes[0])
        if kind == FULL:
            q = (h @ t[p + "self_attn.q_proj.weight"].t()).view(T, c.num_heads, -1)
            q, gate = (q[..., :c.head_dim], q[..., c.head_dim:]) if c.attn_output_gate else (q, None)
            k = (h @ t[p + "self_attn.k_proj.weight"].t()).view(T, c.num_kv_heads, c.head_dim)
            v = (h @ t[p + "self_attn.v_proj.weight"].t()).view(T, c.num_kv_heads, c.head_dim)
            q = apply_rope(norm(q, t[p + "self_attn.q_norm.weight"]), cos, sin)
            k = apply_rope(norm(k, t[p + "self_attn.k_norm.weight"]), cos, sin)
            rep = c.num_heads // c.num_kv_heads
            att = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(rep, 1)) / math.sqrt(c.head_dim)
            att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
            o = torch.einsum("hqk,khd->qhd", att, v.repeat_interleave(rep, 1))
            if gate is not None:
                o = o * torch.sigmoid(gate)
            a = o.reshape(T, -1) @ t[p + "self_attn.o_proj.weight"].t()
        else:
            w = gdn.load_weights(t, p + "linear_attn.", c.gdn_dims, torch.float32, torch.device("cpu"))
            a = gdn.reference(h, w, c.gdn_dims)
        x = (x + a) * (1 - F.silu(t[p + "gpas_attn"]))
        h = norm(x, t[p + "post_attention_layernorm.weight"], s)
        up = h @ t[p + "mlp.up_proj.weight"].t()
        gt = poly_norm(h @ t[p + "mlp.gate_proj.weight"].t(), t[p + "mlp.poly_norm.weight"],
                       t[p + "mlp.poly_norm.bias"])
        x = (x + (gt * up) @ t[p + "mlp.down_proj.weight"].t()) * (1 - F.silu(t[p + "gpas_mlp"]))
    return norm(x, t["norm.weight"]) @ t["embed_tokens.weight"].t()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reference_forward_matches_spec_transcription(variant):
    config, tensors = VARIANTS[variant]()
    full, bound, _ = bind_neollm(tensors, config)
    c = NeoLLMConfig.from_hf(full)
    ids = torch.tensor(prompt(21, 5))
    assert_close(NeoLLMModel(c, bound, torch.float32).reference_forward(ids), spec_forward(c, bound, ids), 1e-5)


def test_random_weights_keep_activations_order_one(model):
    logits = reference_logits(model, prompt(30, 6))
    assert torch.isfinite(logits).all() and 0.5 < logits.std() < 10


# -- engine path against the reference ------------------------------------------------------------

def live_kv(h):
    """Every KV pool, indexed by page id (page 0 is the reserved pad page)."""
    return [t.clone() for kv in h.pools.view.kv for t in kv]


@pytest.mark.parametrize("chunk", [1, 2, 3, 16, None])
def test_chunked_prefill_matches_reference(model, chunk):
    toks = prompt(37)
    ref = reference_logits(model, toks)
    h = Harness(model)
    s = h.new_seq()
    chunk = chunk or len(toks)
    got = torch.cat([h.step([(s, toks[i:i + chunk])])[0] for i in range(0, len(toks), chunk)])
    assert_close(got, ref)
    # the caches equal those of a single-shot prefill
    one = Harness(model)
    one.step([(one.new_seq(), toks)])
    for g, t in h.live_state().items():
        assert_close(t, one.live_state()[g], 1e-5)
    for a, b in zip(live_kv(h), live_kv(one)):
        assert_close(a, b, 1e-5)


@pytest.mark.parametrize("n_prompt", [1, 2, 3, 25])
def test_prefill_then_decode(model, n_prompt):
    toks = prompt(n_prompt + 20, seed=2 + n_prompt)
    ref = reference_logits(model, toks)
    assert_close(Harness(model).prefill_then_decode(toks, n_prompt), ref)


def test_mixed_batch_of_different_lengths(model):
    prompts = [prompt(1, 3), prompt(7, 4), prompt(30, 5), prompt(2, 6)]
    refs = [reference_logits(model, p) for p in prompts]
    h = Harness(model)
    seqs = [h.new_seq() for _ in prompts]
    got = [[] for _ in prompts]

    def run(feeds):
        for k, out in zip([k for k, _ in feeds], h.step([(seqs[k], toks) for k, toks in feeds])):
            got[k].append(out)

    run([(0, prompts[0]), (1, prompts[1][:4]), (2, prompts[2][:10]), (3, prompts[3][:1])])
    run([(1, prompts[1][4:]), (2, prompts[2][10:29]), (3, prompts[3][1:])])   # prefill chunks + a 1-token row
    run([(2, prompts[2][29:])])
    for g, r in zip(got, refs):
        assert_close(torch.cat(g), r)
    # then everyone decodes together, teacher-forced
    extra = [prompt(5, 20 + k) for k in range(4)]
    refs = [reference_logits(model, p + e) for p, e in zip(prompts, extra)]
    for step in range(5):
        for k, out in enumerate(h.step([(seqs[k], [extra[k][step]]) for k in range(4)])):
            assert_close(out, refs[k][len(prompts[k]) + step:len(prompts[k]) + step + 1])


def test_padding_rows_leave_live_caches_untouched(model):
    h = Harness(model)
    a, b = h.new_seq(), h.new_seq()
    h.step([(a, prompt(9, 7)), (b, prompt(5, 8))])
    pages = torch.tensor(a.pages + b.pages)
    state, kv = h.live_state(), [t[pages].clone() for t in live_kv(h)]
    h.step([], pad_rows=3)                               # a pure graph-padding batch: decode path
    h.step([(h.new_seq(), prompt(1, 9))], pad_rows=2)    # padding beside a live row
    after = h.live_state()
    for g in state:
        assert torch.equal(after[g][:, :2], state[g][:, :2]), g
    for x, y in zip(live_kv(h), kv):
        assert torch.equal(x[pages], y)


def test_slot_reused_after_release(model):
    h = Harness(model, num_slots=1)
    a = h.new_seq()
    h.step([(a, prompt(20, 11))])
    h.step([(a, prompt(1, 12))])
    h.release(a)
    toks = prompt(6, 13)
    b = h.new_seq()
    assert b.slot == 1
    got = [h.step([(b, toks[:3])])[0]] + [h.step([(b, [t])])[0] for t in toks[3:]]
    assert_close(torch.cat(got), reference_logits(model, toks))


def test_bf16_random_splits_then_decode():
    """bf16 weights and activations (fp32 GDN state, bf16 conv window): random prefill splits, then decode."""
    m = build(VARIANTS["gated-fanall-2gpas-grouped"](), torch.bfloat16)
    assert m.cache_layout().states["conv"].dtype is None and m.embed.dtype == torch.bfloat16
    toks = prompt(50, 14)
    ref = reference_logits(m, toks)
    h = Harness(m)
    assert h.pools.view.states["conv"].dtype == torch.bfloat16 and h.pools.view.states["gdn"].dtype == torch.float32
    s = h.new_seq()
    rng, got, i = random.Random(0), [], 0
    while i < 40:
        n = rng.randint(1, 9)
        got.append(h.step([(s, toks[i:min(i + n, 40)])])[0])
        i = min(i + n, 40)
    got += [h.step([(s, [t])])[0] for t in toks[40:]]
    assert_close(torch.cat(got), ref, 5e-3)
