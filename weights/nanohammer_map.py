"""NanoHammer checkpoint names (specs/nanohammer.md §6) and synthetic checkpoints of its shapes.

The backbone uses the HF Llama names. The state-path names are the project's working names and their
sub-module names are [reconstruction]: they all sit in STATE_RULES, so the real checkpoint header
corrects them in one place. Unexpected tensors (a per-layer token_to_state, a learned initial state,
LayerNorm biases, a 1024-wide cell input) make `bind` fail and list them: §1 would not match the model.
"""
from __future__ import annotations

from typing import Any

import torch

from hybridserve.weights.name_map import TensorRule, llama_rules


def _state(c):
    return (c["state_hidden_size"],)


def _cell_hidden(c):
    return (c["state_intermediate_size"],)


# Canonical name = checkpoint name without "model.". Biases are optional: whether the Linear layers
# carry them is unknown.
STATE_RULES = [
    TensorRule("model.token_to_state.weight", "token_to_state.weight",
               lambda c: (c["state_hidden_size"], c["hidden_size"])),
    TensorRule("model.token_to_state.bias", "token_to_state.bias", _state, optional=True),
    TensorRule("model.layers.{i}.state_cell.pre_norm.weight", "layers.{i}.state_cell.pre_norm.weight", _state),
    TensorRule("model.layers.{i}.state_cell.mlp.fc1.weight", "layers.{i}.state_cell.mlp.fc1.weight",
               lambda c: (c["state_intermediate_size"], c["state_hidden_size"])),
    TensorRule("model.layers.{i}.state_cell.mlp.fc1.bias", "layers.{i}.state_cell.mlp.fc1.bias", _cell_hidden,
               optional=True),
    TensorRule("model.layers.{i}.state_cell.mlp.fc2.weight", "layers.{i}.state_cell.mlp.fc2.weight",
               lambda c: (c["state_hidden_size"], c["state_intermediate_size"])),
    TensorRule("model.layers.{i}.state_cell.mlp.fc2.bias", "layers.{i}.state_cell.mlp.fc2.bias", _state,
               optional=True),
    TensorRule("model.layers.{i}.state_cell.alpha", "layers.{i}.state_cell.alpha",
               lambda c: (c["state_num_heads"],)),
    TensorRule("model.layers.{i}.state_cell.post_norm.weight", "layers.{i}.state_cell.post_norm.weight", _state),
    TensorRule("model.layers.{i}.state_projection.weight", "layers.{i}.state_projection.weight",
               lambda c: (c["hidden_size"], c["state_hidden_size"])),
    TensorRule("model.layers.{i}.state_projection.bias", "layers.{i}.state_projection.bias",
               lambda c: (c["hidden_size"],), optional=True),
]


def nanohammer_rules(config: dict[str, Any]) -> list[TensorRule]:
    return llama_rules(config) + STATE_RULES


def resolve_variant(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """config.json with the values only the tensor shapes settle (§10) read from them: cell MLP width,
    state width, state head count (α width), and whether lm_head is tied. Shapes win over the file."""
    out = dict(config, tie_word_embeddings="lm_head.weight" not in tensors)
    to_state = tensors.get("model.token_to_state.weight")
    if to_state is not None:
        out["state_hidden_size"] = to_state.shape[0]
    fc1 = tensors.get("model.layers.0.state_cell.mlp.fc1.weight")
    if fc1 is not None:
        out["state_intermediate_size"] = fc1.shape[0]   # its in_features stay checked: 1024 would mean §7.5 R2
    alpha = tensors.get("model.layers.0.state_cell.alpha")
    if alpha is not None:
        out["state_num_heads"] = alpha.shape[0]
    return out


_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

_SIZES = {
    # Llama-3.2-1B backbone (§5) with an untied lm_head (~1.5B) plus the state modules.
    "full": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "state_intermediate_size": 1024,
             "torch_dtype": "bfloat16"},
    # Same structure at test size. The vocabulary covers the SmolLM2 tokenizer synthetic checkpoints ship.
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 49152, "state_intermediate_size": 128,
             "torch_dtype": "float32"},
}


def synth_config(size: str = "tiny") -> dict[str, Any]:
    """config.json of a synthetic NanoHammer checkpoint ("tiny" | "full")."""
    return {
        "model_type": "nanohammer", "architectures": ["NanoHammerForCausalLM"],
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": dict(_LLAMA3_ROPE),
        "max_position_embeddings": 131072, "tie_word_embeddings": False, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False,
        "state_hidden_size": 512, "state_num_heads": 16, "holo_rope_base": 10000.0, "state_norm": "rmsnorm",
        **_SIZES[size],
    }


def synth_nanohammer(size: str = "tiny", seed: int = 0) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A random NanoHammer checkpoint: (config.json dict, tensors under checkpoint names).

    Every tensor of the table is present, optional biases included, so loading exercises all of them.
    Linear weights have std fan_in^-0.5 so activations stay O(1) and the state entry carries real weight.
    """
    config = synth_config(size)
    dtype = getattr(torch, config["torch_dtype"])
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for rule in nanohammer_rules(config):
        if not rule.pattern.startswith(("model.", "lm_head.")):
            continue  # the raw (non-HF) spelling of a backbone tensor
        shape = rule.expected_shape(config)
        names = [rule.pattern.format(i=i) for i in range(config["num_hidden_layers"])] \
            if "{i}" in rule.pattern else [rule.pattern]
        for name in names:
            x = torch.randn(shape, generator=g)
            if name.endswith("norm.weight"):
                x = 1 + 0.1 * x
            elif name.endswith("alpha"):
                x = 0.5 + 0.1 * x
            elif name.endswith("bias"):
                x = 0.02 * x
            elif name != "model.embed_tokens.weight":
                x = x * shape[1] ** -0.5
            tensors[name] = x.to(dtype)
    return config, tensors
