"""Spartacus: monoid kernels vs the naive loop, the attention layer vs the card's element equation (fp64),
the spec's convention pins, the engine path vs the reference forward, and the checkpoint name map."""
import random

import pytest
import torch
import torch.nn.functional as F

from harness import Harness, assert_close, reference_logits
from hybridserve.kernels import monoid
from hybridserve.models.cache import StateSpec
from hybridserve.models.registry import bind_checkpoint, build_model
from hybridserve.models.spartacus import DECAY_GATES, SpartacusConfig, SpartacusModel, log_decay
from hybridserve.weights.checkpoint import Checkpoint, CheckpointError
from hybridserve.weights.name_map import bind
from hybridserve.weights.spartacus_map import resolve_variant, spartacus_rules, synth_spartacus

H, DK, DV = 3, 8, 6


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def recurrence_inputs(T, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, DK, generator=g) * DK ** -0.5
    k = torch.randn(T, H, DK, generator=g)
    v = torch.randn(T, H, DV, generator=g)
    log_a = F.logsigmoid(2 * torch.randn(T, H, DK, generator=g) + 2)
    return q.to(dtype), k.to(dtype), v.to(dtype), log_a


# -- kernels ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 200])
def test_chunked_matches_naive_from_a_random_state(T):
    q, k, v, log_a = recurrence_inputs(T, seed=T)
    s0 = torch.randn(H, DK, DV, generator=torch.Generator().manual_seed(99))
    o_ref, s_ref = monoid.naive(q, k, v, log_a, s0)
    o, s = monoid.chunked(q, k, v, log_a, s0)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    assert s.dtype == torch.float32


def test_chunked_is_stable_under_very_strong_decay():
    q, k, v, _ = recurrence_inputs(150, seed=3)
    log_a = -30 * torch.rand(150, H, DK, generator=torch.Generator().manual_seed(4))
    o_ref, s_ref = monoid.naive(q, k, v, log_a)
    o, s = monoid.chunked(q, k, v, log_a, chunk_size=32)
    assert torch.isfinite(o).all() and rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_readout_is_inclusive():
    """One token from the zero state: o_1 = (q_1·k_1) v_1 and S_1 = k_1 v_1ᵀ, whatever the decay."""
    q, k, v, log_a = recurrence_inputs(1, seed=5)
    for fn in (monoid.naive, monoid.chunked):
        o, s = fn(q, k, v, log_a)
        assert torch.allclose(o[0], (q[0] * k[0]).sum(-1, keepdim=True) * v[0], atol=1e-6)
        assert torch.allclose(s, k[0][:, :, None] * v[0][:, None, :])


def test_bf16_activations_keep_an_fp32_state():
    q, k, v, log_a = recurrence_inputs(20, seed=6, dtype=torch.bfloat16)
    o, s = monoid.chunked(q, k, v, log_a)
    o_ref, s_ref = monoid.naive(q, k, v, log_a)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel_err(s, s_ref) < 1e-5 and rel_err(o, o_ref) < 1e-2


def test_varlen_prefill_continues_from_and_updates_its_slots_in_place():
    lens, slots = [5, 1, 70, 3], [3, 0, 1, 5]          # slot 0 = a padding row
    pool = torch.randn(7, H, DK, DV, generator=torch.Generator().manual_seed(7))
    before = pool.clone()
    ptr = pool.data_ptr()
    q, k, v, log_a = recurrence_inputs(sum(lens), seed=8)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    o = monoid.varlen_prefill(q, k, v, log_a, cu, pool, torch.tensor(slots))
    assert pool.data_ptr() == ptr
    for b, slot in enumerate(slots):
        s, e = cu[b].item(), cu[b + 1].item()
        o_ref, s_ref = monoid.naive(q[s:e], k[s:e], v[s:e], log_a[s:e], before[slot])
        assert rel_err(o[s:e], o_ref) < 1e-5 and rel_err(pool[slot], s_ref) < 1e-5
    for untouched in (2, 4, 6):
        assert torch.equal(pool[untouched], before[untouched])


def test_decode_step_updates_slots_in_place_and_pad_rows_touch_only_slot_0():
    slots = [2, 0, 5, 0]
    pool = torch.randn(7, H, DK, DV, generator=torch.Generator().manual_seed(9))
    before = pool.clone()
    q, k, v, log_a = recurrence_inputs(len(slots), seed=10)
    o = monoid.decode_step(q, k, v, log_a, pool, torch.tensor(slots))
    for b, slot in enumerate(slots):
        o_ref, s_ref = monoid.naive(q[b:b + 1], k[b:b + 1], v[b:b + 1], log_a[b:b + 1], before[slot])
        assert rel_err(o[b], o_ref[0]) < 1e-5
        if slot:
            assert rel_err(pool[slot], s_ref) < 1e-5
    for untouched in (1, 3, 4, 6):
        assert torch.equal(pool[untouched], before[untouched])


# -- checkpoints and models ------------------------------------------------------------------------

def tiny_checkpoint(gate="sigmoid", full_width_norm=False, seed=0):
    """The synthetic tiny checkpoint, switched to another decay gate and/or full-width q/k norms."""
    cfg, t = synth_spartacus("tiny", seed)
    cfg = dict(cfg, decay_gate=gate)
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    g = torch.Generator().manual_seed(seed + 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        if gate == "scalar_sigmoid":
            t[p + "decay_proj.weight"] = torch.randn(heads, hidden, generator=g) * 0.5 * hidden ** -0.5
            t[p + "decay_proj.bias"] = 2.2 + 2.4 * torch.rand(heads, generator=g)
        if full_width_norm:
            t[p + "q_norm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
            t[p + "k_norm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
    return cfg, t


def build(cfg, tensors, dtype=torch.float32) -> SpartacusModel:
    cfg = resolve_variant(cfg, tensors)
    weights, _ = bind(tensors, spartacus_rules(cfg), cfg["num_hidden_layers"], cfg)
    return SpartacusModel(SpartacusConfig.from_hf(cfg), weights, dtype)


def card_attention_fp64(cfg, t, layer, x):
    """The attention sublayer straight from the card (spec §7.2), in fp64, from the checkpoint tensors:
    S_t[i,j] = α_t[i]·S_{t−1}[i,j] + k_t[i]·v_t[j],  o_t[j] = Σ_i q_t[i]·S_t[i,j]."""
    heads, d, eps = cfg["num_attention_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    p = f"model.layers.{layer}.self_attn."
    W = {n: t[p + n].double() for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                                        "decay_proj.weight", "decay_proj.bias", "q_norm.weight", "k_norm.weight")}
    x = x.double()
    T = x.shape[0]

    def norm(y, w):           # RMSNorm per head ([d] weight) or over all heads ([H*d] weight)
        y = y.view(T, heads, d) if w.numel() == d else y
        y = y / torch.sqrt((y * y).mean(-1, keepdim=True) + eps) * w
        return y.reshape(T, heads, d)

    q = norm(x @ W["q_proj.weight"].T, W["q_norm.weight"]) / d ** 0.5
    k = F.silu(norm(x @ W["k_proj.weight"].T, W["k_norm.weight"]))
    v = (x @ W["v_proj.weight"].T).view(T, heads, d)
    z = x @ W["decay_proj.weight"].T + W["decay_proj.bias"]
    gate = cfg["decay_gate"]
    if gate == "sigmoid":
        alpha = torch.sigmoid(z).view(T, heads, d)
    elif gate == "neg_softplus":
        alpha = torch.exp(-F.softplus(z)).view(T, heads, d)
    else:
        alpha = torch.sigmoid(z)[:, :, None].expand(T, heads, d)
    S = torch.zeros(heads, d, d, dtype=torch.float64)
    o = torch.empty(T, heads, d, dtype=torch.float64)
    for s in range(T):
        S = alpha[s][:, :, None] * S + k[s][:, :, None] * v[s][:, None, :]      # [h, i, j]
        o[s] = (q[s][:, :, None] * S).sum(1)                                  # sum over i
    return o.reshape(T, -1) @ W["o_proj.weight"].T


@pytest.mark.parametrize("full_width_norm", [False, True])
@pytest.mark.parametrize("gate", DECAY_GATES)
def test_attention_layer_matches_card_equation_in_fp64(gate, full_width_norm):
    cfg, t = tiny_checkpoint(gate, full_width_norm)
    model = build(cfg, t)
    x = torch.randn(40, cfg["hidden_size"], generator=torch.Generator().manual_seed(11))
    for layer in (0, 2):
        assert rel_err(model.reference_attention(layer, x), card_attention_fp64(cfg, t, layer, x)) < 1e-5


def test_log_decay_is_never_positive():
    z = torch.linspace(-80, 80, 1001).view(-1, 1, 1)
    for gate in DECAY_GATES:
        assert (log_decay(z, gate) <= 0).all()


def test_neg_softplus_equals_sigmoid_with_negated_projection():
    cfg, t = tiny_checkpoint("neg_softplus")
    flipped = {n: -x if ".decay_proj." in n else x for n, x in t.items()}
    toks = torch.tensor(prompt(30, 12))
    a = build(cfg, t).reference_forward(toks)
    b = build(dict(cfg, decay_gate="sigmoid"), flipped).reference_forward(toks)
    assert rel_err(a, b) < 1e-5


def test_scalar_sigmoid_equals_sigmoid_with_rows_repeated():
    cfg, t = tiny_checkpoint("scalar_sigmoid")
    d = cfg["head_dim"]
    repeated = {n: x.repeat_interleave(d, dim=0) if ".decay_proj." in n else x for n, x in t.items()}
    toks = torch.tensor(prompt(30, 13))
    a = build(cfg, t).reference_forward(toks)
    b = build(dict(cfg, decay_gate="sigmoid"), repeated).reference_forward(toks)
    assert rel_err(a, b) < 1e-5


# -- engine path vs reference forward ----------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return build(*synth_spartacus("tiny", 0))


def prompt(n, seed=1):
    rng = random.Random(seed)
    return [rng.randrange(49152) for _ in range(n)]


def slot_state(h: Harness, slot: int) -> torch.Tensor:
    return h.pools.view.states["monoid"][:, slot].clone()


@pytest.mark.parametrize("chunk", [1, 3, 16, None])
def test_chunked_prefill_matches_reference(model, chunk):
    toks = prompt(37)
    whole = Harness(model)
    w = whole.new_seq()
    whole.step([(w, toks)])
    h = Harness(model)
    s = h.new_seq()
    chunk = chunk or len(toks)
    got = torch.cat([h.step([(s, toks[i:i + chunk])])[0] for i in range(0, len(toks), chunk)])
    assert_close(got, reference_logits(model, toks))
    assert rel_err(slot_state(h, s.slot), slot_state(whole, w.slot)) < 1e-5


def test_prefill_then_20_decode_steps(model):
    toks = prompt(45, seed=2)
    assert_close(Harness(model).prefill_then_decode(toks, 25), reference_logits(model, toks))


def test_mixed_batch_of_one_token_short_and_long_prompts(model):
    prompts = [prompt(1, 3), prompt(7, 4), prompt(70, 5), prompt(2, 6)]
    h = Harness(model)
    seqs = [h.new_seq() for _ in prompts]
    got = [[] for _ in prompts]
    feeds = [(seqs[0], prompts[0]), (seqs[1], prompts[1][:4]), (seqs[2], prompts[2][:10]), (seqs[3], prompts[3])]
    for k, o in enumerate(h.step(feeds)):
        got[k].append(o)
    # prefill chunks beside decode rows, then a decode-only step
    for k, o in zip([1, 2, 0], h.step([(seqs[1], prompts[1][4:]), (seqs[2], prompts[2][10:69]), (seqs[0], [5])])):
        got[k].append(o)
    for k, o in zip([2, 0, 3], h.step([(seqs[2], prompts[2][69:]), (seqs[0], [6]), (seqs[3], [7])])):
        got[k].append(o)
    full = [prompts[0] + [5, 6], prompts[1], prompts[2], prompts[3] + [7]]
    for g, toks in zip(got, full):
        assert_close(torch.cat(g), reference_logits(model, toks))


def test_one_token_prompt_is_one_decode_step(model):
    toks = prompt(1, 9)
    h = Harness(model)
    s = h.new_seq()
    assert_close(h.step([(s, toks)])[0], reference_logits(model, toks))


def test_slot_reuse_starts_from_zero(model):
    h = Harness(model, num_slots=1)
    a = h.new_seq()
    first = a.slot
    h.step([(a, prompt(40, 11))])
    h.release(a)
    toks = prompt(30, 12)
    b = h.new_seq()
    assert b.slot == first
    got = [h.step([(b, toks[:20])])[0]] + [h.step([(b, [t])])[0] for t in toks[20:]]
    assert_close(torch.cat(got), reference_logits(model, toks))


def test_padding_rows_never_change_live_states(model):
    def run(pad_rows):
        h = Harness(model)
        a, b, idle = h.new_seq(), h.new_seq(), h.new_seq()
        h.step([(idle, prompt(9, 20))])
        idle_state = slot_state(h, idle.slot)
        out = h.step([(a, prompt(12, 21)), (b, prompt(5, 22))], pad_rows=pad_rows)    # varlen path
        out += h.step([(a, [3]), (b, [4])], pad_rows=pad_rows)                          # decode path
        if pad_rows:
            h.step([], pad_rows=pad_rows)                                               # pad rows alone
        assert torch.equal(slot_state(h, idle.slot), idle_state)
        return h, out

    h0, plain = run(0)
    h1, padded = run(3)
    # A request outside the batch is bit-identical (above). Rows inside it match the unpadded run only to
    # rounding: CPU GEMMs round differently when the batch height changes (e.g. 2 rows vs 5).
    for x, y in zip(plain, padded):
        assert_close(y, x, tol=1e-6)
    for g, live in h0.live_state().items():
        assert rel_err(h1.live_state()[g], live) < 1e-6


def test_bf16_engine_matches_reference():
    model = build(*synth_spartacus("tiny", 4), dtype=torch.bfloat16)
    toks = prompt(40, 14)
    h = Harness(model)
    s = h.new_seq()
    got = [h.step([(s, toks[i:i + 16])])[0] for i in range(0, 32, 16)] + [h.step([(s, [t])])[0] for t in toks[32:]]
    assert h.pools.view.states["monoid"].dtype == torch.float32
    assert_close(torch.cat(got), reference_logits(model, toks), tol=1e-3)


def test_forked_state_gives_identical_continuations(model):
    h = Harness(model)
    a = h.new_seq()
    h.step([(a, prompt(20, 30))])
    b = h.new_seq()
    b.tokens = list(a.tokens)
    h.pools.view.states["monoid"][:, b.slot] = h.pools.view.states["monoid"][:, a.slot]
    for t in prompt(5, 31):
        la, lb = h.step([(a, [t]), (b, [t])])
        assert torch.equal(la, lb)


def test_state_per_request_is_fixed_fp32():
    full = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "head_dim": 64,
            "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True, "decay_gate": "sigmoid"}
    # shapes only: the full model on the meta device, bound through the real name table
    tensors = {r.pattern.format(i=i): torch.empty(r.expected_shape(full), device="meta")
               for r in spartacus_rules(full) if not r.optional for i in range(16)}
    weights, report = bind(tensors, spartacus_rules(full), 16, full)
    model = SpartacusModel(SpartacusConfig.from_hf(full), weights, torch.bfloat16, "meta")
    layout = model.cache_layout()
    assert layout.kv is None and layout.kv_bytes_per_token(torch.bfloat16) == 0
    assert layout.states == {"monoid": StateSpec(16, (32, 64, 64), torch.float32)}
    assert layout.state_bytes_per_slot(torch.bfloat16) == {"monoid": 8 * 2 ** 20}     # 512 KiB per layer
    assert model.lm_head is model.embed


# -- name map ---------------------------------------------------------------------------------------

def test_synthetic_checkpoint_binds_through_the_registry_and_is_tied():
    cfg, t = synth_spartacus("tiny", 1)
    ckpt = Checkpoint("spartacus", cfg, t, "synthetic")
    _, _, report = bind_checkpoint(ckpt)
    assert report.ok
    model = build_model(ckpt, torch.float32, torch.device("cpu"))
    assert isinstance(model, SpartacusModel) and model.lm_head is model.embed


def test_report_names_a_renamed_and_a_misshaped_tensor():
    cfg, t = synth_spartacus("tiny", 2)
    t["model.layers.1.mlp.upproj.weight"] = t.pop("model.layers.1.mlp.up_proj.weight")
    t["model.layers.0.self_attn.k_norm.weight"] = torch.ones(cfg["head_dim"] + 1)
    _, report = bind(t, spartacus_rules(cfg), cfg["num_hidden_layers"], cfg, strict=False)
    assert [n for n, _ in report.missing] == ["model.layers.1.mlp.up_proj.weight"]
    assert [n for n, _ in report.unexpected] == ["model.layers.1.mlp.upproj.weight"]
    assert [n for n, *_ in report.mismatched] == ["model.layers.0.self_attn.k_norm.weight"]
    with pytest.raises(CheckpointError) as err:
        bind(t, spartacus_rules(cfg), cfg["num_hidden_layers"], cfg)
    for name in ("mlp.up_proj", "mlp.upproj", "k_norm"):
        assert name in str(err.value)


@pytest.mark.parametrize("ckpt_gate, config_gate", [("sigmoid", "scalar_sigmoid"), ("scalar_sigmoid", "sigmoid"),
                                                    ("scalar_sigmoid", "neg_softplus")])
def test_decay_proj_shape_that_disagrees_with_decay_gate_fails_clearly(ckpt_gate, config_gate):
    cfg, t = tiny_checkpoint(ckpt_gate)
    with pytest.raises(CheckpointError, match=f"decay_proj.weight .* decay_gate='{config_gate}'"):
        resolve_variant(dict(cfg, decay_gate=config_gate), t)


def test_untied_checkpoint_needs_and_uses_lm_head():
    cfg, t = synth_spartacus("tiny", 3)
    cfg = dict(cfg, tie_word_embeddings=False)
    _, report = bind(t, spartacus_rules(cfg), cfg["num_hidden_layers"], cfg, strict=False)
    assert [n for n, _ in report.missing] == ["lm_head.weight"]
    t["lm_head.weight"] = torch.randn(cfg["vocab_size"], cfg["hidden_size"]) * 0.1
    model = build(cfg, t)
    assert torch.equal(model.lm_head, t["lm_head.weight"])
