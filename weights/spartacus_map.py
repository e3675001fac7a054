"""Spartacus checkpoint names (specs/spartacus.md §6) -> canonical names of models/spartacus.py.

This is the ONE explicit name table for Spartacus: once the real checkpoint header is checked (§12),
corrections go here only. Two variant switches are decided by tensor shapes, not by config.json:
`resolve_variant` reads them from the checkpoint and checks them against the config before binding.
"""
from __future__ import annotations

from typing import Any

import torch

from hybridserve.weights.checkpoint import CheckpointError
from hybridserve.weights.name_map import TensorRule

# per-layer checkpoint suffix (after "model.layers.{i}.") -> canonical suffix (after "layers.{i}.")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.decay_proj.weight": "attn.decay_proj.weight",
    "self_attn.decay_proj.bias": "attn.decay_proj.bias",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn.gate_proj.weight",
    "mlp.up_proj.weight": "ffn.up_proj.weight",
    "mlp.down_proj.weight": "ffn.down_proj.weight",
}


def _dims(config: dict[str, Any]) -> tuple[int, int, int, int, int, int]:
    try:
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        return (hidden, heads, config.get("head_dim") or hidden // heads, config["intermediate_size"],
                config["vocab_size"], config["num_hidden_layers"])
    except KeyError as exc:
        raise CheckpointError(f"config lacks {exc.args[0]!r}") from None


def spartacus_rules(config: dict[str, Any]) -> list[TensorRule]:
    """The name table, with shapes from the config.

    decay_proj is [H*d, hidden] for the per-key-dim gates and [H, hidden] for "scalar_sigmoid"; its bias
    is required only for "sigmoid" (the v3 card shows it). q/k norms are [d] (per head) unless
    `qk_norm_width` (set by resolve_variant from the checkpoint) says otherwise. lm_head is optional
    unless the config says the embeddings are untied.
    """
    hidden, heads, head_dim, inter, vocab, _ = _dims(config)
    width = heads * head_dim
    gate = config.get("decay_gate", "sigmoid")
    gate_width = heads if gate == "scalar_sigmoid" else width
    norm_width = config.get("qk_norm_width", head_dim)
    shapes = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (width, hidden),
        "self_attn.k_proj.weight": (width, hidden),
        "self_attn.v_proj.weight": (width, hidden),
        "self_attn.o_proj.weight": (hidden, width),
        "self_attn.decay_proj.weight": (gate_width, hidden),
        "self_attn.decay_proj.bias": (gate_width,),
        "self_attn.q_norm.weight": (norm_width,),
        "self_attn.k_norm.weight": (norm_width,),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    rules = [
        TensorRule("model.embed_tokens.weight", "embed_tokens.weight", (vocab, hidden)),
        TensorRule("model.norm.weight", "norm.weight", (hidden,)),
        TensorRule("lm_head.weight", "lm_head.weight", (vocab, hidden),
                   optional=config.get("tie_word_embeddings", True) is not False),
    ]
    for ckpt, canon in _LAYER_NAMES.items():
        optional = ckpt == "self_attn.decay_proj.bias" and gate != "sigmoid"
        rules.append(TensorRule(f"model.layers.{{i}}.{ckpt}", f"layers.{{i}}.{canon}", shapes[ckpt], optional))
    return rules


def resolve_variant(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The config with the shape-decided switches filled in (§1.3, §6); call it before binding.

    Raises CheckpointError when decay_proj's width disagrees with config `decay_gate`: loading v1 weights
    with a v3 gate (or the reverse) would run but compute the wrong recurrence.
    """
    _, heads, head_dim, _, _, _ = _dims(config)
    out = dict(config)
    q_norm = tensors.get("model.layers.0.self_attn.q_norm.weight")
    if q_norm is not None:
        out["qk_norm_width"] = q_norm.shape[0]
    decay = tensors.get("model.layers.0.self_attn.decay_proj.weight")
    if decay is not None:
        gate = config.get("decay_gate", "sigmoid")
        expected = heads if gate == "scalar_sigmoid" else heads * head_dim
        if decay.shape[0] != expected:
            found = {heads: "one gate per head (decay_gate 'scalar_sigmoid')",
                     heads * head_dim: "one gate per key dim (decay_gate 'sigmoid' or 'neg_softplus')",
                     }.get(decay.shape[0], "no known gate layout")
            raise CheckpointError(
                f"model.layers.0.self_attn.decay_proj.weight is {list(decay.shape)}, which means {found}, but "
                f"config decay_gate={gate!r} expects {expected} rows; set decay_gate in config.json to match "
                f"the checkpoint revision (specs/spartacus.md §1.3)"
            )
    return out


def synth_spartacus(size: str, seed: int = 0) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A random checkpoint with checkpoint names: "full" = the spec's working dims in bf16, "tiny" = small
    dims in fp32 (vocab 49152: synthetic checkpoints ship the SmolLM2 tokenizer).

    Init keeps activations O(1): projections ~ N(0, 1/fan_in), residual branch outputs scaled by
    1/sqrt(2L), embeddings ~ N(0, 1/hidden) so tied logits have unit variance, and the decay bias puts
    α = sigmoid(bias) uniformly in logit space between 0.9 and 0.99.
    """
    if size == "full":
        hidden, layers, heads, head_dim, inter, vocab, dtype = 2048, 16, 32, 64, 8192, 128256, torch.bfloat16
    elif size == "tiny":
        hidden, layers, heads, head_dim, inter, vocab, dtype = 64, 3, 4, 16, 128, 49152, torch.float32
    else:
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    config = {
        "model_type": "spartacus", "architectures": ["MonoidForCausalLM"],
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads, "head_dim": head_dim,
        "intermediate_size": inter, "vocab_size": vocab, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "decay_gate": "sigmoid", "torch_dtype": "bfloat16" if dtype == torch.bfloat16 else "float32",
    }
    g = torch.Generator().manual_seed(seed)
    width = heads * head_dim
    branch = (2 * layers) ** -0.5

    def normal(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm_weight(n):
        return normal(n, std=0.1) + 1

    lo, hi = torch.logit(torch.tensor(0.9)), torch.logit(torch.tensor(0.99))
    t = {"model.embed_tokens.weight": normal(vocab, hidden, std=hidden ** -0.5),
         "model.norm.weight": norm_weight(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {
            p + "input_layernorm.weight": norm_weight(hidden),
            p + "self_attn.q_proj.weight": normal(width, hidden, std=hidden ** -0.5),
            p + "self_attn.k_proj.weight": normal(width, hidden, std=hidden ** -0.5),
            p + "self_attn.v_proj.weight": normal(width, hidden, std=hidden ** -0.5),
            p + "self_attn.o_proj.weight": normal(hidden, width, std=branch * width ** -0.5),
            p + "self_attn.decay_proj.weight": normal(width, hidden, std=0.5 * hidden ** -0.5),
            p + "self_attn.decay_proj.bias": (lo + (hi - lo) * torch.rand(width, generator=g)).to(dtype),
            p + "self_attn.q_norm.weight": norm_weight(head_dim),
            p + "self_attn.k_norm.weight": norm_weight(head_dim),
            p + "post_attention_layernorm.weight": norm_weight(hidden),
            p + "mlp.gate_proj.weight": normal(inter, hidden, std=hidden ** -0.5),
            p + "mlp.up_proj.weight": normal(inter, hidden, std=hidden ** -0.5),
            p + "mlp.down_proj.weight": normal(hidden, inter, std=branch * inter ** -0.5),
        }
    return config, t
