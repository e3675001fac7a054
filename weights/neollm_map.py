"""NeoLLM checkpoint names → canonical names, variant inference from tensor shapes, synthetic checkpoints.

The pinned revision's modeling code is not published (specs/neollm.md §2), so every checkpoint name below
is a reconstruction: Qwen3-Next names for the known modules, and chosen names for the FAN, PolyNorm and
GPAS modules (`NAMES`). The variant (attention gate, FAN placement, MLP width, GPAS gate count, GDN
projection layout, RMSNorm form, LNS form) is read from the tensors themselves (§8, §13), and anything
left over or missing fails with the full list, never a partial load.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from hybridserve.models.neollm import FULL, LINEAR, NeoLLMConfig
from hybridserve.weights.name_map import BindReport, TensorRule, bind

PINNED = "KitsuVp/NeoLLM @ 04da2a7b052baba585cb22e8bc9068ec03c19b45"

# Checkpoint names under `model.layers.{i}.` of the modules whose names are NOT known for the pinned revision
# ([reconstruction], neollm.md §7 / §11.1). Change them here, and only here, once the header has been read.
NAMES = {
    "fan": "fan.input_linear",                        # under self_attn. / linear_attn. (FANformer FANLayer)
    "poly_norm": "mlp.act_fn",                        # PolyNorm weight [3], bias [1]
    "gpas_shared": "gpas.gate",                       # one GPAS gate for both residual adds
    "gpas_pair": ("gpas_attn.gate", "gpas_mlp.gate"), # or one gate per residual add
}
MIXER = {FULL: "self_attn", LINEAR: "linear_attn"}


def neollm_rules(config: dict[str, Any]) -> list[TensorRule]:
    """The name map for the variant described by `config` (after infer_neollm_variant filled it in)."""
    c = NeoLLMConfig.from_hf(config)
    d = c.gdn_dims
    D, inter, hd = c.hidden_size, c.intermediate_size, c.head_dim
    full = [i for i, t in enumerate(c.layer_types) if t == FULL]
    linear = [i for i, t in enumerate(c.layer_types) if t == LINEAR]
    q_rows = c.num_heads * hd * (2 if c.attn_output_gate else 1)
    kv_rows = c.num_kv_heads * hd
    gpas_shape = tuple(config.get("gpas_shape", (1,)))

    # (checkpoint name under model.layers.{i}., canonical name under layers.{i}., shape, layers; None = all)
    table: list[tuple[str, str, tuple[int, ...], list[int] | None]] = [
        ("input_layernorm.weight", "input_layernorm.weight", (D,), None),
        ("post_attention_layernorm.weight", "post_attention_layernorm.weight", (D,), None),
        ("mlp.gate_proj.weight", "mlp.gate_proj.weight", (inter, D), None),
        ("mlp.up_proj.weight", "mlp.up_proj.weight", (inter, D), None),
        ("mlp.down_proj.weight", "mlp.down_proj.weight", (D, inter), None),
        (NAMES["poly_norm"] + ".weight", "mlp.poly_norm.weight", (3,), None),
        (NAMES["poly_norm"] + ".bias", "mlp.poly_norm.bias", (1,), None),
        ("self_attn.q_proj.weight", "self_attn.q_proj.weight", (q_rows, D), full),
        ("self_attn.k_proj.weight", "self_attn.k_proj.weight", (kv_rows, D), full),
        ("self_attn.v_proj.weight", "self_attn.v_proj.weight", (kv_rows, D), full),
        ("self_attn.o_proj.weight", "self_attn.o_proj.weight", (D, c.num_heads * hd), full),
        ("self_attn.q_norm.weight", "self_attn.q_norm.weight", (hd,), full),
        ("self_attn.k_norm.weight", "self_attn.k_norm.weight", (hd,), full),
        ("linear_attn.conv1d.weight", "linear_attn.conv1d.weight", (d.conv_dim, 1, d.conv_kernel), linear),
        ("linear_attn.dt_bias", "linear_attn.dt_bias", (d.num_v_heads,), linear),
        ("linear_attn.A_log", "linear_attn.A_log", (d.num_v_heads,), linear),
        ("linear_attn.norm.weight", "linear_attn.norm.weight", (d.head_v_dim,), linear),
        ("linear_attn.out_proj.weight", "linear_attn.out_proj.weight", (D, d.value_dim), linear),
    ]
    if config.get("gdn_layout", "grouped") == "grouped":
        projections = {"in_proj_qkvz": (2 * d.key_dim + 2 * d.value_dim, D), "in_proj_ba": (2 * d.num_v_heads, D)}
    else:
        projections = {"in_proj_qkv": (d.conv_dim, D), "in_proj_z": (d.value_dim, D),
                       "in_proj_b": (d.num_v_heads, D), "in_proj_a": (d.num_v_heads, D)}
    for name, shape in projections.items():
        table.append((f"linear_attn.{name}.weight", f"linear_attn.{name}.weight", shape, linear))
    p, g = c.fan_sizes
    for kind, mixer in MIXER.items():
        if c.fan_placement in ("all", kind):
            on = full if kind == FULL else linear
            table += [(f"{mixer}.{NAMES['fan']}.weight", "fan.weight", (p + g, D), on),
                      (f"{mixer}.{NAMES['fan']}.bias", "fan.bias", (p + g,), on)]
    if config.get("gpas_gates", 1) == 2:
        table += [(NAMES["gpas_pair"][0], "gpas_attn", gpas_shape, None),
                  (NAMES["gpas_pair"][1], "gpas_mlp", gpas_shape, None)]
    else:  # one shared gate binds to both canonical gates
        table += [(NAMES["gpas_shared"], "gpas_attn", gpas_shape, None),
                  (NAMES["gpas_shared"], "gpas_mlp", gpas_shape, None)]

    rules = [TensorRule("model.embed_tokens.weight", "embed_tokens.weight", (c.vocab_size, D)),
             TensorRule("model.norm.weight", "norm.weight", (D,)),
             TensorRule("lm_head.weight", "lm_head.weight", (c.vocab_size, D), optional=c.tie_word_embeddings)]
    rules += [TensorRule("model.layers.{i}." + ckpt, "layers.{i}." + canon, shape, layers=on)
              for ckpt, canon, shape, on in table]
    return rules


# -- variant inference (neollm.md §8, §13) --------------------------------------------------------

def _layer_shapes(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, tuple[int, ...]]]:
    """{layer index: {name under model.layers.{i}.: shape}}."""
    out: dict[int, dict[str, tuple[int, ...]]] = {}
    for name, t in tensors.items():
        parts = name.split(".", 3)
        if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
            out.setdefault(int(parts[2]), {})[parts[3]] = tuple(t.shape)
    return out


def _has_fan(names: dict[str, tuple[int, ...]], rows: int, hidden: int) -> bool:
    """A FAN input linear: a [p+g, hidden] weight with a [p+g] bias in the same module."""
    return any(shape == (rows, hidden) and names.get(n[:-len("weight")] + "bias") == (rows,)
               for n, shape in names.items() if n.endswith(".weight"))


def _gpas_gates(names: dict[str, tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Shapes of a layer's scalar tensors that are not PolyNorm's bias (the one beside a [3] weight)."""
    def module(n):
        return n.rsplit(".", 1)[0] if "." in n else ""

    poly = {module(n) for n, s in names.items() if s == (3,)}
    return [s for n, s in names.items() if math.prod(s) == 1 and module(n) not in poly]


def _norm_form(tensors: dict[str, torch.Tensor], num_layers: int) -> tuple[bool, bool] | None:
    """(zero_centered_norm, lns_forward) from the input-norm weight means (§13): the nearest of mean ≈ 0
    ((1 + w) form), ≈ 1 (plain), ≈ 1/√(l+1) (plain with LNS baked into the weights)."""
    names = {i: f"model.layers.{i}.input_layernorm.weight" for i in range(num_layers)}
    means = {i: tensors[n].float().mean().item() for i, n in names.items() if n in tensors}
    if not means:
        return None
    err = {
        (True, True): sum(m ** 2 for m in means.values()),
        (False, True): sum((m - 1) ** 2 for m in means.values()),
        (False, False): sum((m - (i + 1) ** -0.5) ** 2 for i, m in means.items()),
    }
    return min(err, key=err.get)


def infer_neollm_variant(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, Any]:
    """Config keys decided by the tensors: attn_output_gate, fan_placement, intermediate_size, gpas_gates,
    gpas_shape, gdn_layout, zero_centered_norm, lns_forward. Keys without evidence are left out."""
    c = NeoLLMConfig.from_hf(config)
    layers = _layer_shapes(tensors)
    found: dict[str, Any] = {}
    q_rows = {names["self_attn.q_proj.weight"][0] for names in layers.values() if "self_attn.q_proj.weight" in names}
    plain_rows = c.num_heads * c.head_dim
    if len(q_rows) == 1 and q_rows <= {plain_rows, 2 * plain_rows}:
        found["attn_output_gate"] = q_rows == {2 * plain_rows}
    p, g = c.fan_sizes
    kinds = {c.layer_types[i] for i, names in layers.items()
             if i < c.num_layers and _has_fan(names, p + g, c.hidden_size)}
    found["fan_placement"] = "all" if len(kinds) == 2 else (kinds.pop() if kinds else "none")
    widths = {names["mlp.gate_proj.weight"][0] for names in layers.values() if "mlp.gate_proj.weight" in names}
    if len(widths) == 1:
        found["intermediate_size"] = widths.pop()
    gates = _gpas_gates(layers.get(0, {}))
    if len(gates) in (1, 2):
        found["gpas_gates"], found["gpas_shape"] = len(gates), list(gates[0])
    all_names = {n for names in layers.values() for n in names}
    if "linear_attn.in_proj_qkvz.weight" in all_names:
        found["gdn_layout"] = "grouped"
    elif "linear_attn.in_proj_qkv.weight" in all_names:
        found["gdn_layout"] = "separate"
    form = _norm_form(tensors, c.num_layers)
    if form is not None:
        found["zero_centered_norm"], found["lns_forward"] = form
    return found


def resolve_variant(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """config.json with the variant keys the tensors decide; tensor evidence wins over the file."""
    return {**config, **infer_neollm_variant(tensors, config)}


def bind_neollm(tensors: dict[str, torch.Tensor], config: dict[str, Any], *, strict: bool = True
                ) -> tuple[dict[str, Any], dict[str, torch.Tensor], BindReport]:
    """Infer the variant, then bind all-or-nothing. Returns (config with the variant keys, canonical
    tensors, report); with strict, a mismatch raises CheckpointError naming the revision and variant."""
    variant = infer_neollm_variant(tensors, config)
    full = {**config, **variant}
    header = (f"NeoLLM checkpoint does not match the name map for {PINNED} "
              f"(inferred variant: {', '.join(f'{k}={v}' for k, v in variant.items())})")
    bound, report = bind(tensors, neollm_rules(full), full["num_hidden_layers"], full, strict=strict, header=header)
    return full, bound, report


# -- synthetic checkpoints ------------------------------------------------------------------------

_SIZES = {
    # the 110M working dimensions of neollm.md §4, bf16
    "full": dict(vocab_size=151665, hidden_size=512, intermediate_size=1024, num_hidden_layers=12,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64, linear_num_key_heads=8,
                 linear_key_head_dim=32, linear_num_value_heads=16, linear_value_head_dim=32),
    # small enough for CPU tests; the vocabulary covers the SmolLM2 tokenizer synthetic checkpoints ship
    "tiny": dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                 linear_key_head_dim=16, linear_num_value_heads=4, linear_value_head_dim=16),
}


def synth_neollm(size: str, seed: int = 0, *, attn_output_gate: bool = False, fan_placement: str = "all",
                 gpas_gates: int = 1, intermediate_size: int | None = None
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A random NeoLLM checkpoint (config.json dict, tensors under checkpoint names, grouped GDN layout,
    zero-centred norms). Scales keep activations O(1) and the GDN decay close enough to 1 that the
    recurrent state matters over many tokens. The variant keys are not in the config: the loader must
    infer them from the tensors, as it would for a real checkpoint."""
    dims = dict(_SIZES[size])
    if intermediate_size:
        dims["intermediate_size"] = intermediate_size
    n = dims["num_hidden_layers"]
    config = {
        "model_type": "neollm", "architectures": ["NeoLLMForCausalLM"], **dims,
        "layer_types": [FULL if (i + 1) % 4 == 0 else LINEAR for i in range(n)],
        "linear_conv_kernel_dim": 4, "partial_rotary_factor": 0.25, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512, "tie_word_embeddings": True, "fan_ratio": 0.125,
        "torch_dtype": "bfloat16" if size == "full" else "float32",
    }
    rules_config = {**config, "attn_output_gate": attn_output_gate, "fan_placement": fan_placement,
                    "gpas_gates": gpas_gates, "gdn_layout": "grouped"}
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if size == "full" else torch.float32
    tensors = {}
    for rule in neollm_rules(rules_config):
        for i in (range(n) if "{i}" in rule.pattern else [0]):
            if rule.optional or (rule.layers is not None and i not in rule.layers):
                continue
            name = rule.pattern.format(i=i)
            tensors[name] = _random_tensor(name, rule.expected_shape(rules_config), gen).to(dtype)
    return config, tensors


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """One synthetic tensor, scaled by its role so a random model stays numerically tame."""
    def randn(scale: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * scale

    if name.endswith("embed_tokens.weight"):
        return randn(2 * shape[1] ** -0.5)                  # unit-scale logits through the tied head
    if name.endswith("linear_attn.norm.weight"):
        return 1 + randn(0.1)                               # the gated norm uses a plain weight
    if name.endswith("layernorm.weight") or name.endswith("_norm.weight") or name == "model.norm.weight":
        return randn(0.1)                                   # zero-centred: the effective weight is 1 + w
    if name.endswith("A_log"):
        return torch.empty(shape).uniform_(0.02, 1.0, generator=gen).log()
    if name.endswith("dt_bias"):
        return randn(0.5) - 1.0
    if name.endswith("conv1d.weight"):
        return randn(0.5)
    if name.endswith(NAMES["poly_norm"] + ".weight"):
        return 1 / 3 + randn(0.05)
    if name.endswith("gate") or name.endswith(".bias"):
        return randn(0.2)                                   # GPAS gates, PolyNorm and FAN biases
    fan_in = shape[-1]
    out = name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight"))
    return randn((0.5 if out else 1.0) * fan_in ** -0.5)
