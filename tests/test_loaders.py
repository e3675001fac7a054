"""Checkpoint loading from disk: safetensors dirs (single/sharded), torch files, name maps, config inference."""
from __future__ import annotations

import io
import json
import os
import pickle
import sys
import types

import pytest
import torch
import zstandard
from safetensors.torch import save_file

from hybridserve.weights import safetensors_dir
from hybridserve.weights.checkpoint import CheckpointError
from hybridserve.weights.loader import load_checkpoint
from hybridserve.weights.name_map import TensorRule, bind, llama_rules
from hybridserve.weights.safetensors_dir import detect_arch, load_hf_dir
from hybridserve.weights.torch_ckpt import load_torch_checkpoint, load_torch_file

LLAMA_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"],
    "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48, "tie_word_embeddings": True,
}


def llama_hf_tensors(cfg=LLAMA_CONFIG) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, v, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    t = {"model.embed_tokens.weight": torch.randn(v, h, generator=g), "model.norm.weight": torch.ones(h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t |= {
            p + "input_layernorm.weight": torch.randn(h, generator=g),
            p + "post_attention_layernorm.weight": torch.randn(h, generator=g).to(torch.bfloat16),
            p + "self_attn.q_proj.weight": torch.randn(q, h, generator=g),
            p + "self_attn.k_proj.weight": torch.randn(kv, h, generator=g),
            p + "self_attn.v_proj.weight": torch.randn(kv, h, generator=g),
            p + "self_attn.o_proj.weight": torch.randn(h, q, generator=g),
            p + "mlp.gate_proj.weight": torch.randn(inter, h, generator=g),
            p + "mlp.up_proj.weight": torch.randn(inter, h, generator=g),
            p + "mlp.down_proj.weight": torch.randn(h, inter, generator=g),
        }
    return t


def kotodama_tensors(layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, vocab=40):
    g = torch.Generator().manual_seed(1)
    t = {
        "embed_tokens.weight": torch.randn(vocab, hidden, generator=g), "norm.weight": torch.ones(hidden),
        "final_res_query": torch.zeros(hidden), "final_res_norm.weight": torch.ones(hidden),
    }
    for i in range(layers):
        p = f"layers.{i}."
        t |= {
            p + "attn_norm.weight": torch.ones(hidden), p + "ffn_norm.weight": torch.ones(hidden),
            p + "attn.q_proj.weight": torch.randn(heads * head_dim, hidden, generator=g),
            p + "attn.k_proj.weight": torch.randn(kv_heads * head_dim, hidden, generator=g),
            p + "attn.v_proj.weight": torch.randn(kv_heads * head_dim, hidden, generator=g),
            p + "attn.o_proj.weight": torch.randn(hidden, heads * head_dim, generator=g),
            p + "attn.q_norm.weight": torch.ones(head_dim), p + "attn.k_norm.weight": torch.ones(head_dim),
            p + "ffn.gate_proj.weight": torch.randn(inter, hidden, generator=g),
            p + "ffn.up_proj.weight": torch.randn(inter, hidden, generator=g),
            p + "ffn.down_proj.weight": torch.randn(hidden, inter, generator=g),
            p + "attn_res_query": torch.zeros(hidden), p + "attn_res_norm.weight": torch.ones(hidden),
            p + "mlp_res_query": torch.zeros(hidden), p + "mlp_res_norm.weight": torch.ones(hidden),
        }
    return t


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def write_config(d, cfg=LLAMA_CONFIG):
    (d / "config.json").write_text(json.dumps(cfg))


def write_sharded(d, tensors, n_shards=2):
    names = sorted(tensors)
    weight_map = {}
    for s in range(n_shards):
        shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[s::n_shards]}
        save_file(part, str(d / shard))
        weight_map |= {k: shard for k in part}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


# ---- safetensors directories -------------------------------------------------------------------------

def test_sharded_dir_loads_like_single_file(tmp_path):
    tensors = llama_hf_tensors()
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    single.mkdir(), sharded.mkdir()
    write_config(single), write_config(sharded)
    save_file(tensors, str(single / "model.safetensors"))
    write_sharded(sharded, tensors, n_shards=3)
    (single / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))

    a, b = load_hf_dir(single, progress=False), load_hf_dir(sharded, progress=False)
    assert_same(a.tensors, tensors)
    assert_same(b.tensors, tensors)
    assert a.arch == b.arch == "llama" and a.config == LLAMA_CONFIG
    assert a.generation == {"eos_token_id": 2} and b.generation == {}
    assert a.tokenizer is None


def test_missing_shard_is_named(tmp_path):
    weight_map = write_sharded(tmp_path, llama_hf_tensors())
    write_config(tmp_path)
    gone = sorted(set(weight_map.values()))[1]
    (tmp_path / gone).unlink()
    with pytest.raises(CheckpointError, match=gone):
        load_hf_dir(tmp_path, progress=False)


def test_tensor_missing_from_shard_is_named(tmp_path):
    weight_map = write_sharded(tmp_path, llama_hf_tensors())
    write_config(tmp_path)
    weight_map["model.layers.7.mlp.up_proj.weight"] = sorted(set(weight_map.values()))[0]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError) as err:
        load_hf_dir(tmp_path, progress=False)
    assert "model.layers.7.mlp.up_proj.weight" in str(err.value)
    assert weight_map["model.layers.7.mlp.up_proj.weight"] in str(err.value)


@pytest.mark.parametrize("sharded", [False, True])
def test_truncated_file_fails_before_any_tensor_is_read(tmp_path, monkeypatch, sharded):
    tensors = llama_hf_tensors()
    write_config(tmp_path)
    if sharded:
        weight_map = write_sharded(tmp_path, tensors)
        victim = tmp_path / sorted(set(weight_map.values()))[1]
    else:
        victim = tmp_path / "model.safetensors"
        save_file(tensors, str(victim))
    header = safetensors_dir.read_safetensors_header(victim)
    last = max(header, key=lambda n: header[n].end)
    cut = header[last].begin + 3  # keep part of the last tensor only
    victim.write_bytes(victim.read_bytes()[:cut])

    def no_reading(*args, **kwargs):
        raise AssertionError("tensor data read before the headers were validated")

    monkeypatch.setattr(safetensors_dir, "safe_open", no_reading)
    with pytest.raises(CheckpointError) as err:
        load_hf_dir(tmp_path, progress=False)
    assert victim.name in str(err.value) and repr(last) in str(err.value) and "truncated" in str(err.value)


def test_truncated_header(tmp_path):
    write_config(tmp_path)
    save_file(llama_hf_tensors(), str(tmp_path / "model.safetensors"))
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_hf_dir(tmp_path, progress=False)


def test_missing_or_invalid_config(tmp_path):
    save_file(llama_hf_tensors(), str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_hf_dir(tmp_path, progress=False)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_dir(tmp_path, progress=False)


def test_progress_bar_on_large_checkpoints(tmp_path, monkeypatch, capsys):
    write_config(tmp_path)
    save_file(llama_hf_tensors(), str(tmp_path / "model.safetensors"))
    load_hf_dir(tmp_path, progress=True)
    assert "loading weights" not in capsys.readouterr().err  # tiny: no bar
    monkeypatch.setattr(safetensors_dir, "PROGRESS_MIN_BYTES", 0)
    load_hf_dir(tmp_path, progress=True)
    assert "loading weights" in capsys.readouterr().err


def test_tokenizer_is_loaded_through_tokenizer_module(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("hybridserve.weights.tokenizer")
    fake.Tokenizer = type("Tokenizer", (), {"from_hf_dir": staticmethod(lambda p: calls.append(p) or "tok")})
    monkeypatch.setitem(sys.modules, "hybridserve.weights.tokenizer", fake)
    write_config(tmp_path)
    save_file(llama_hf_tensors(), str(tmp_path / "model.safetensors"))
    (tmp_path / "tokenizer.json").write_text("{}")
    assert load_hf_dir(tmp_path, progress=False).tokenizer == "tok" and calls == [tmp_path]


def test_real_tokenizer_json(tmp_path):
    pytest.importorskip("hybridserve.weights.tokenizer")
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "<unk>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    write_config(tmp_path)
    save_file(llama_hf_tensors(), str(tmp_path / "model.safetensors"))
    assert load_hf_dir(tmp_path, progress=False).tokenizer is not None


def test_detect_arch():
    assert detect_arch({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) == "llama"
    assert detect_arch({"model_type": "llama", "attn_res": True}) == "kotodama"
    assert detect_arch({"model_type": "kotodama"}) == "kotodama"
    assert detect_arch({"architectures": ["MonoidForCausalLM"]}) == "spartacus"
    assert detect_arch({"model_type": "neollm"}) == "neollm"
    assert detect_arch({"model_type": "llama", "architectures": ["NanoHammerForCausalLM"]}) == "nanohammer"
    with pytest.raises(CheckpointError, match="supported: .*llama.*spartacus.*neollm.*nanohammer"):
        detect_arch({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


# ---- torch files -------------------------------------------------------------------------------------

def save_torch(path, obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if path.name.endswith(".zst") else data)


@pytest.mark.parametrize("suffix", [".pt", ".pt.zst"])
@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module.", "module._orig_mod.", "_orig_mod.module.module."])
@pytest.mark.parametrize("wrapped", [False, True])
def test_torch_formats_and_prefixes_load_identically(tmp_path, suffix, prefix, wrapped):
    sd = kotodama_tensors(layers=2)
    stored = {prefix + k: v for k, v in sd.items()}
    path = tmp_path / f"ckpt{suffix}"
    save_torch(path, {"model": stored, "step": 5, "tokens_consumed": 10} if wrapped else stored)
    assert_same(load_torch_file(path), sd)


class _Payload:
    """Unpickling this runs `touch marker` through os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["raw.pt", "zip.pt", "zip.pt.zst"])
def test_malicious_pickle_never_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    live = tmp_path / "payload_is_live"
    pickle.loads(pickle.dumps(_Payload(live), protocol=2))
    assert live.exists()  # the payload really would run if unpickled

    path = tmp_path / f"evil-{kind}"
    if kind == "raw.pt":
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    else:
        save_torch(path, {"model": {"w": torch.zeros(2)}, "step": 1, "extra": _Payload(marker)})
    with pytest.raises(CheckpointError) as err:
        load_torch_file(path)
    assert not marker.exists()
    assert path.name in str(err.value)
    assert "system" in str(err.value)
    assert "weights_only=False" not in str(err.value).replace("torch.load(weights_only=True)", "")


def test_non_tensor_value_rejected(tmp_path):
    path = tmp_path / "x.pt"
    save_torch(path, {"model": {"w": torch.zeros(2), "layers.0.scale": 3.0}})
    with pytest.raises(CheckpointError, match=r"x\.pt.*'layers\.0\.scale'.*float"):
        load_torch_file(path)


def test_corrupt_zstd_and_garbage(tmp_path):
    bad = tmp_path / "bad.pt.zst"
    bad.write_bytes(b"not zstd at all")
    with pytest.raises(CheckpointError, match="bad.pt.zst"):
        load_torch_file(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_torch_file(junk)


# ---- Kotodama config inference -----------------------------------------------------------------------

def test_kotodama_config_inferred_from_tensors(tmp_path):
    path = tmp_path / "koto.pt.zst"
    save_torch(path, {"model": {"_orig_mod." + k: v for k, v in kotodama_tensors().items()}, "step": 5})
    with pytest.raises(CheckpointError, match="attn_res_boundaries"):
        load_torch_checkpoint(path, None)  # 4 layers: no default boundaries

    ckpt = load_torch_checkpoint(path, {"attn_res_boundaries": [0, 2]})
    assert ckpt.arch == "kotodama" and ckpt.source == str(path)
    c = ckpt.config
    assert (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"],
            c["head_dim"], c["intermediate_size"], c["vocab_size"]) == (64, 4, 4, 2, 16, 96, 40)
    assert c["attn_res"] and c["qk_norm"] and c["tie_word_embeddings"] and c["attn_res_boundaries"] == [0, 2]
    assert (c["rope_theta"], c["rms_norm_eps"], c["max_position_embeddings"]) == (500000.0, 1e-5, 4096)

    tensors, report = bind(ckpt.tensors, llama_rules(c), c["num_hidden_layers"], c)
    assert report.ok and "layers.3.mlp_res_norm.weight" in tensors and "final_res_query" in tensors
    assert report.num_params == sum(t.numel() for t in ckpt.tensors.values())


def test_kotodama_28_layers_gets_ddv1_boundaries(tmp_path):
    path = tmp_path / "koto.pt"
    save_torch(path, kotodama_tensors(layers=28, hidden=16, heads=2, kv_heads=1, head_dim=8, inter=16, vocab=8))
    ckpt = load_torch_checkpoint(path, None)
    assert ckpt.config["attn_res_boundaries"] == [0, 3, 7, 12, 21, 25]


def test_sibling_config_wins(tmp_path):
    path = tmp_path / "koto.pt"
    save_torch(path, kotodama_tensors())
    (tmp_path / "config.json").write_text(json.dumps({"attn_res_boundaries": [0, 1, 3], "rope_theta": 1e4}))
    ckpt = load_torch_checkpoint(path, {"attn_res_boundaries": [0, 2]})
    assert ckpt.config["attn_res_boundaries"] == [0, 1, 3] and ckpt.config["rope_theta"] == 1e4


def test_hf_torch_file_needs_a_config(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    save_torch(path, llama_hf_tensors())
    with pytest.raises(CheckpointError, match="config.json"):
        load_torch_checkpoint(path, None)
    assert load_torch_checkpoint(path, LLAMA_CONFIG).arch == "llama"


# ---- name maps ---------------------------------------------------------------------------------------

def test_llama_hf_binds_to_canonical_names():
    tensors = llama_hf_tensors()
    bound, report = bind(tensors, llama_rules(LLAMA_CONFIG), 2, LLAMA_CONFIG)
    assert report.ok
    expected = {"embed_tokens.weight", "norm.weight"} | {
        f"layers.{i}.{n}.weight" for i in range(2) for n in
        ["attn_norm", "ffn_norm", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
         "ffn.gate_proj", "ffn.up_proj", "ffn.down_proj"]
    }
    assert set(bound) == expected
    assert bound["layers.1.attn.k_proj.weight"] is tensors["model.layers.1.self_attn.k_proj.weight"]
    # 50*32 + 32 + 2 * (2*32 + 32*32 + 2*16*32 + 32*32 + 3*48*32)
    assert report.num_params == 50 * 32 + 32 + 2 * (64 + 1024 + 1024 + 1024 + 4608) == 17120
    assert report.num_params == sum(t.numel() for t in tensors.values())


def test_bind_reports_renamed_and_misshaped_tensors():
    tensors = llama_hf_tensors()
    tensors["model.layers.1.mlp.upproj.weight"] = tensors.pop("model.layers.1.mlp.up_proj.weight")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    with pytest.raises(CheckpointError) as err:
        bind(tensors, llama_rules(LLAMA_CONFIG), 2, LLAMA_CONFIG, header="tiny llama")
    msg = str(err.value)
    assert msg.startswith("tiny llama")
    for name in ["model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.upproj.weight",
                 "model.layers.0.self_attn.k_proj.weight"]:
        assert name in msg

    bound, report = bind(tensors, llama_rules(LLAMA_CONFIG), 2, LLAMA_CONFIG, strict=False)
    assert bound == {}
    assert report.missing == [("model.layers.1.mlp.up_proj.weight", (48, 32))]
    assert report.unexpected == [("model.layers.1.mlp.upproj.weight", (48, 32))]
    assert report.mismatched == [("model.layers.0.self_attn.k_proj.weight", (16, 32), (8, 32))]
    assert not report.ok


def test_missing_raw_tensor_reported_in_raw_spelling():
    cfg = {**LLAMA_CONFIG, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "hidden_size": 64, "intermediate_size": 96, "vocab_size": 40,
           "qk_norm": True, "attn_res": True}
    tensors = kotodama_tensors()
    del tensors["layers.2.attn.k_norm.weight"]
    _, report = bind(tensors, llama_rules(cfg), 4, cfg, strict=False)
    assert report.missing == [("layers.2.attn.k_norm.weight", (16,))] and not report.unexpected


def test_untied_lm_head_is_required_and_tied_is_optional():
    untied = {**LLAMA_CONFIG, "tie_word_embeddings": False}
    _, report = bind(llama_hf_tensors(), llama_rules(untied), 2, untied, strict=False)
    assert report.missing == [("lm_head.weight", (50, 32))]
    tensors = llama_hf_tensors() | {"lm_head.weight": torch.zeros(50, 32)}
    bound, _ = bind(tensors, llama_rules(LLAMA_CONFIG), 2, LLAMA_CONFIG)
    assert "lm_head.weight" in bound


def test_rule_layers_and_callable_shapes():
    rules = [TensorRule("blk.{i}.a", "layers.{i}.a", lambda c: (c["n"],), layers={1, 3}),
             TensorRule("top", "top", (2,))]
    tensors = {"blk.1.a": torch.zeros(5), "blk.3.a": torch.zeros(5), "top": torch.zeros(2), "blk.0.a": torch.zeros(5)}
    _, report = bind(tensors, rules, 4, {"n": 5}, strict=False)
    assert report.unexpected == [("blk.0.a", (5,))] and not report.missing


# ---- the single entry point --------------------------------------------------------------------------

def test_load_checkpoint_dispatch(tmp_path):
    with pytest.raises(CheckpointError, match="nope"):
        load_checkpoint(tmp_path / "nope")

    hf = tmp_path / "hf"
    hf.mkdir()
    write_config(hf)
    save_file(llama_hf_tensors(), str(hf / "weights.safetensors"))
    assert load_checkpoint(hf / "weights.safetensors", progress=False).arch == "llama"
    assert load_checkpoint(hf, progress=False).arch == "llama"  # only *.safetensors in the dir

    koto = tmp_path / "koto"
    koto.mkdir()
    save_torch(koto / "kotodama-108m-base-fc.pt.zst", {"model": kotodama_tensors(), "step": 5})
    (koto / "config.json").write_text(json.dumps({"attn_res_boundaries": [0, 2]}))
    (koto / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    by_dir = load_checkpoint(koto, progress=False)
    by_file = load_checkpoint(str(koto / "kotodama-108m-base-fc.pt.zst"))
    assert by_dir.arch == by_file.arch == "kotodama" and by_dir.generation == {"eos_token_id": 0}
    assert_same(by_dir.tensors, by_file.tensors)

    lone = tmp_path / "lone.safetensors"
    save_file({"a": torch.zeros(1)}, str(lone))
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(lone)
    odd = tmp_path / "model.onnx"
    odd.write_bytes(b"")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_checkpoint(odd)
