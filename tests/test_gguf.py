"""Loading the embedded SmolLM2 GGUF: names, shapes, config, Q/K layout, dequantization, bad files."""
import numpy as np
import pytest
import torch
from gguf import GGUFWriter

from hybridserve.weights.checkpoint import CheckpointError
from hybridserve.weights.embedded import EMBEDDED_MODEL_NAME, embedded_gguf_path, verify_embedded_sha256
from hybridserve.weights.gguf import (FastGGUFReader, load_gguf, permute_for_interleaved,
                                      unpermute_from_interleaved)

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 9, 3, 64, 576


@pytest.fixture(scope="module")
def ckpt():
    return load_gguf(embedded_gguf_path(), progress=False)


@pytest.fixture(scope="module")
def raw():
    """The file's tensors as stored (quantized bytes, GGUF row layout), by GGUF name."""
    return {t.name: t for t in FastGGUFReader(embedded_gguf_path()).tensors}


def test_embedded_file_is_the_pinned_one():
    path = embedded_gguf_path()
    assert path.name.startswith(EMBEDDED_MODEL_NAME) and path.stat().st_size == 98_362_432
    verify_embedded_sha256(path)


def test_config(ckpt):
    assert ckpt.arch == "llama"
    assert ckpt.config == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "vocab_size": 49152,
        "max_position_embeddings": 8192, "tie_word_embeddings": True,
    }
    assert ckpt.generation["eos_token_id"] == [2, 0]
    assert ckpt.tokenizer.eos_token_ids == [2, 0] and ckpt.tokenizer.chat_template.startswith("{% for message")


def test_names_shapes_dtypes(ckpt):
    t = ckpt.tensors
    assert len(t) == 2 + 30 * 9 and "lm_head.weight" not in t
    assert t["model.embed_tokens.weight"].shape == (49152, 576)
    assert t["model.norm.weight"].shape == (576,)
    layer = "model.layers.29."
    assert t[layer + "input_layernorm.weight"].shape == t[layer + "post_attention_layernorm.weight"].shape == (576,)
    assert t[layer + "self_attn.q_proj.weight"].shape == t[layer + "self_attn.o_proj.weight"].shape == (576, 576)
    assert t[layer + "self_attn.k_proj.weight"].shape == t[layer + "self_attn.v_proj.weight"].shape == (192, 576)
    assert t[layer + "mlp.gate_proj.weight"].shape == t[layer + "mlp.up_proj.weight"].shape == (1536, 576)
    assert t[layer + "mlp.down_proj.weight"].shape == (576, 1536)
    assert all(w.dtype == torch.float32 and w.is_contiguous() for w in t.values())
    norm = t["model.norm.weight"]
    norm.add_(0)                                        # writable: copied out of the read-only mapping
    assert torch.isfinite(norm).all()


def _dequant_q4_1(raw: np.ndarray) -> np.ndarray:
    """Q4_1 from the block layout in specs/embedded-default.md: d:f16, m:f16, qs[16]; low nibbles are elements
    0-15, high nibbles 16-31; w = d*q + m."""
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return (d * q + m).reshape(raw.shape[0], -1)


def _dequant_q8_0(raw: np.ndarray) -> np.ndarray:
    """Q8_0: d:f16, qs[32] int8; w = d*q."""
    blocks = raw.reshape(-1, 34)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(raw.shape[0], -1)


def test_dequantization_matches_the_block_layout(ckpt, raw):
    assert raw["token_embd.weight"].tensor_type.name == "Q8_0"
    emb = _dequant_q8_0(np.asarray(raw["token_embd.weight"].data))
    assert torch.equal(ckpt.tensors["model.embed_tokens.weight"], torch.from_numpy(emb))
    assert raw["blk.3.ffn_down.weight"].tensor_type.name == "Q4_1"
    down = _dequant_q4_1(np.asarray(raw["blk.3.ffn_down.weight"].data))
    assert torch.equal(ckpt.tensors["model.layers.3.mlp.down_proj.weight"], torch.from_numpy(down))
    norm = np.array(raw["blk.3.attn_norm.weight"].data)
    assert torch.equal(ckpt.tensors["model.layers.3.input_layernorm.weight"], torch.from_numpy(norm))


def test_qk_unpermutation_matches_transformers(ckpt, raw):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS})
    for gguf_name, ours in (("blk.7.attn_q.weight", "model.layers.7.self_attn.q_proj.weight"),
                            ("blk.7.attn_k.weight", "model.layers.7.self_attn.k_proj.weight")):
        stored = _dequant_q4_1(np.asarray(raw[gguf_name].data))
        expected = processor.process(weights=stored, name=gguf_name).weights
        assert torch.equal(ckpt.tensors[ours], torch.from_numpy(np.ascontiguousarray(expected)))


def _rope_tables(T: int):
    inv = 1.0 / (100000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM))
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv          # [T, HEAD_DIM/2]
    return angles.cos(), angles.sin()


def _rope_rotate_half(x, cos, sin):
    """HF Llama: pair dimension i with i + HEAD_DIM/2."""
    x1, x2 = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _rope_interleaved(x, cos, sin):
    """llama.cpp: pair dimension 2i with 2i + 1."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


def _scores(x, wq, wk, rope):
    """Causal-free attention logits q·k for every query head against its KV head (GQA)."""
    T = x.shape[0]
    cos, sin = _rope_tables(T)
    q = rope((x @ wq.T).view(T, HEADS, HEAD_DIM).transpose(0, 1), cos, sin)
    k = rope((x @ wk.T).view(T, KV_HEADS, HEAD_DIM).transpose(0, 1), cos, sin)
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=0)
    return q @ k.transpose(-1, -2)


def test_unpermuted_qk_with_rotate_half_equals_gguf_layout_with_interleaved_rope(ckpt, raw):
    wq = ckpt.tensors["model.layers.0.self_attn.q_proj.weight"].double()
    wk = ckpt.tensors["model.layers.0.self_attn.k_proj.weight"].double()
    gq = torch.from_numpy(_dequant_q4_1(np.asarray(raw["blk.0.attn_q.weight"].data))).double()
    gk = torch.from_numpy(_dequant_q4_1(np.asarray(raw["blk.0.attn_k.weight"].data))).double()
    assert torch.equal(permute_for_interleaved(wq, HEADS), gq)
    assert torch.equal(permute_for_interleaved(wk, KV_HEADS), gk)
    assert torch.equal(unpermute_from_interleaved(gk, KV_HEADS), wk)

    x = torch.randn(12, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = _scores(x, wq, wk, _rope_rotate_half)
    stored = _scores(x, gq, gk, _rope_interleaved)
    torch.testing.assert_close(ours, stored, rtol=1e-9, atol=1e-9)
    mixed = _scores(x, gq, gk, _rope_rotate_half)       # the silent failure the un-permutation prevents
    assert (mixed - stored).abs().max() > 1e-2 * stored.abs().max()


def test_truncated_file_names_the_file(tmp_path):
    part = tmp_path / "truncated-smollm.gguf"
    with open(embedded_gguf_path(), "rb") as f:
        part.write_bytes(f.read(10 * 2**20))
    with pytest.raises(CheckpointError, match="truncated-smollm.gguf"):
        load_gguf(part, progress=False)


def test_corrupt_and_missing_files(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(CheckpointError, match="junk.gguf"):
        load_gguf(junk, progress=False)
    with pytest.raises(CheckpointError, match="absent.gguf"):
        load_gguf(tmp_path / "absent.gguf", progress=False)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "tiny-mamba.gguf"
    writer = GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="'mamba' is not supported"):
        load_gguf(path, progress=False)
