"""Llama / Kotodama engine path (paged KV, chunked prefill, mixed batches) against the reference forward."""
import random

import pytest
import torch

from harness import Harness, assert_close, reference_logits
from hybridserve.models.llama import LlamaConfig, LlamaModel


def tiny_weights(c: LlamaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.02):
        return torch.randn(*shape, generator=g) * scale

    D, I, H, K, hd = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    w = {"embed_tokens.weight": r(c.vocab_size, D, scale=1.0), "norm.weight": 1 + r(D, scale=0.1)}
    for i in range(c.num_layers):
        p = f"layers.{i}."
        w[p + "attn_norm.weight"] = 1 + r(D, scale=0.1)
        w[p + "ffn_norm.weight"] = 1 + r(D, scale=0.1)
        w[p + "attn.q_proj.weight"] = r(H * hd, D, scale=0.2)
        w[p + "attn.k_proj.weight"] = r(K * hd, D, scale=0.2)
        w[p + "attn.v_proj.weight"] = r(K * hd, D, scale=0.2)
        w[p + "attn.o_proj.weight"] = r(D, H * hd, scale=0.2)
        w[p + "ffn.gate_proj.weight"] = r(I, D, scale=0.2)
        w[p + "ffn.up_proj.weight"] = r(I, D, scale=0.2)
        w[p + "ffn.down_proj.weight"] = r(D, I, scale=0.2)
        if c.qk_norm:
            w[p + "attn.q_norm.weight"] = 1 + r(hd, scale=0.1)
            w[p + "attn.k_norm.weight"] = 1 + r(hd, scale=0.1)
        if c.attn_res:
            for x in ("attn_res", "mlp_res"):
                w[p + x + "_query"] = r(D, scale=0.5)
                w[p + x + "_norm.weight"] = 1 + r(D, scale=0.1)
    if c.attn_res:
        w["final_res_query"] = r(D, scale=0.5)
        w["final_res_norm.weight"] = 1 + r(D, scale=0.1)
    return w


def tiny_config(kotodama: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=6 if kotodama else 3,
                       num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512,
                       qk_norm=kotodama, attn_res=kotodama, attn_res_boundaries=[0, 2, 4] if kotodama else [])


@pytest.fixture(params=["llama", "kotodama"], scope="module")
def model(request):
    c = tiny_config(request.param == "kotodama")
    return LlamaModel(c, tiny_weights(c), torch.float32)


def prompt(n, seed=1):
    rng = random.Random(seed)
    return [rng.randrange(97) for _ in range(n)]


@pytest.mark.parametrize("chunk", [1, 3, 16, None])
def test_chunked_prefill_matches_reference(model, chunk):
    toks = prompt(37)
    ref = reference_logits(model, toks)
    h = Harness(model)
    s = h.new_seq()
    chunk = chunk or len(toks)
    got = torch.cat([h.step([(s, toks[i:i + chunk])])[0] for i in range(0, len(toks), chunk)])
    assert_close(got, ref)


def test_prefill_then_decode(model):
    toks = prompt(45, seed=2)
    ref = reference_logits(model, toks)
    assert_close(Harness(model).prefill_then_decode(toks, 25), ref)


def test_mixed_batch_of_different_lengths(model):
    prompts = [prompt(1, 3), prompt(7, 4), prompt(30, 5), prompt(2, 6)]
    refs = [reference_logits(model, p) for p in prompts]
    h = Harness(model)
    seqs = [h.new_seq() for _ in prompts]
    got = [[] for _ in prompts]
    # step 1: all of prompt 0 and 3, the first chunk of the others
    feeds = [(seqs[0], prompts[0]), (seqs[1], prompts[1][:4]), (seqs[2], prompts[2][:10]), (seqs[3], prompts[3])]
    for k, o in zip([0, 1, 2, 3], h.step(feeds)):
        got[k].append(o)
    # step 2: prompts 1 and 2 continue while nothing else runs; step 3: mixed prefill + decode-style rows
    for k, o in zip([1, 2], h.step([(seqs[1], prompts[1][4:]), (seqs[2], prompts[2][10:29])])):
        got[k].append(o)
    for k, o in zip([2], h.step([(seqs[2], prompts[2][29:])])):
        got[k].append(o)
    for g, r in zip(got, refs):
        assert_close(torch.cat(g), r)


def test_one_token_prompt_alone_and_with_padding(model):
    toks = prompt(1, 9)
    ref = reference_logits(model, toks)
    h = Harness(model)
    s = h.new_seq()
    assert_close(h.step([(s, toks)], pad_rows=3)[0], ref)


def test_pages_reused_after_release(model):
    h = Harness(model, num_pages=16)
    a = h.new_seq()
    h.step([(a, prompt(40, 11))])
    h.release(a)
    toks = prompt(40, 12)
    b = h.new_seq()
    assert_close(h.step([(b, toks)])[0], reference_logits(model, toks))
    h.release(b)
    assert h.pools.pages.num_used == 0
