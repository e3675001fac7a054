"""Name maps: checkpoint tensor names -> canonical module names, checked against shapes from the config.

Each architecture declares one table of `TensorRule`s. `bind` applies it all-or-nothing: it either
returns every expected tensor under its canonical name, or a report listing every missing, unexpected
and mis-shaped tensor, so a model is never loaded partially and one run shows all the differences.

Several rules may produce the same target: they are alternative spellings of that tensor (for example
HF `model.layers.{i}...` names and raw training names). Tables list alternatives in the same order for
every target, so a missing tensor is reported under the spelling the rest of the checkpoint uses.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from hybridserve.weights.checkpoint import CheckpointError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorRule:
    pattern: str                                        # checkpoint name; "{i}" = layer index
    target: str                                         # canonical name, same "{i}"
    shape: Shape | Callable[[dict[str, Any]], Shape]    # fixed, or computed from the config
    optional: bool = False                              # absent is fine (e.g. a tied lm_head)
    layers: Collection[int] | None = None               # per-layer rules: only these layers (None = all)

    def expected_shape(self, config: dict[str, Any]) -> Shape:
        return tuple(self.shape(config)) if callable(self.shape) else tuple(self.shape)


@dataclass
class BindReport:
    missing: list[tuple[str, Shape]] = field(default_factory=list)
    unexpected: list[tuple[str, Shape]] = field(default_factory=list)
    mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)
    num_params: int = 0  # parameters of the tensors that matched name and shape

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self, header: str) -> str:
        lines = [header]
        if self.ok:
            lines.append(f"  all tensors match ({self.num_params:,} parameters)")
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}):")
            lines += [f"    {name}  {list(shape)}" for name, shape in self.missing]
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}):")
            lines += [f"    {name}  {list(shape)}" for name, shape in self.unexpected]
        if self.mismatched:
            lines.append(f"  wrong shape ({len(self.mismatched)}):")
            lines += [
                f"    {name}  expected {list(want)}, found {list(got)}" for name, want, got in self.mismatched
            ]
        return "\n".join(lines)


def bind(
    tensors: dict[str, torch.Tensor],
    rules: list[TensorRule],
    num_layers: int,
    config: dict[str, Any],
    *,
    strict: bool = True,
    header: str = "checkpoint does not match the model",
) -> tuple[dict[str, torch.Tensor], BindReport]:
    """Rename `tensors` to canonical names and check them against `rules`.

    strict: raise CheckpointError with the full report when anything differs. With strict=False the
    report is returned instead (for `hybridserve inspect`), and the dict is empty unless the report is ok.
    """
    # canonical name -> alternatives [(checkpoint name, shape, optional)], in rule order
    alternatives: dict[str, list[tuple[str, Shape, bool]]] = {}
    for rule in rules:
        try:
            shape = rule.expected_shape(config)
        except KeyError as exc:
            raise CheckpointError(f"config lacks {exc.args[0]!r}, needed for the shape of {rule.pattern}") from None
        per_layer = "{i}" in rule.pattern
        indices = [i for i in range(num_layers) if rule.layers is None or i in rule.layers] if per_layer else [0]
        for i in indices:
            alternatives.setdefault(rule.target.format(i=i), []).append(
                (rule.pattern.format(i=i), shape, rule.optional)
            )

    # Which spelling the checkpoint uses: the alternative position that matches most often.
    usage = Counter(
        pos for alts in alternatives.values() if len(alts) > 1
        for pos, (name, _, _) in enumerate(alts) if name in tensors
    )
    preferred = usage.most_common(1)[0][0] if usage else 0

    report = BindReport()
    bound: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for target, alts in alternatives.items():
        present = [alt for alt in alts if alt[0] in tensors]
        if not present:
            name, shape, optional = alts[preferred] if preferred < len(alts) else alts[0]
            if not optional:
                report.missing.append((name, shape))
            continue
        preferred_alt = alts[preferred] if preferred < len(alts) else None
        name, shape, _ = preferred_alt if preferred_alt in present else present[0]
        consumed.add(name)
        found = tuple(tensors[name].shape)
        if found != shape:
            report.mismatched.append((name, shape, found))
            continue
        bound[target] = tensors[name]
        report.num_params += tensors[name].numel()

    # Unconsumed names, including a second spelling of a tensor that was already bound.
    report.unexpected = [(name, tuple(t.shape)) for name, t in tensors.items() if name not in consumed]
    if not report.ok:
        if strict:
            raise CheckpointError(report.format(header))
        return {}, report
    return bound, report


def llama_rules(config: dict[str, Any]) -> list[TensorRule]:
    """Llama / SmolLM2 / Kotodama (kotodama.md §5, §12): HF names first, raw Kotodama training names second.

    Canonical names are the Kotodama module names. q/k norms come with `qk_norm`, the AttnRes queries and
    norms with `attn_res` (raw names only: no HF export of them exists). lm_head is optional unless the
    config says the embeddings are untied.
    """
    try:
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads", heads)
        head_dim = config.get("head_dim") or hidden // heads
        inter = config["intermediate_size"]
        vocab = config["vocab_size"]
    except KeyError as exc:
        raise CheckpointError(f"config lacks {exc.args[0]!r}") from None

    shapes = {
        "attn_norm": (hidden,), "ffn_norm": (hidden,),
        "attn.q_proj": (heads * head_dim, hidden), "attn.k_proj": (kv_heads * head_dim, hidden),
        "attn.v_proj": (kv_heads * head_dim, hidden), "attn.o_proj": (hidden, heads * head_dim),
        "ffn.gate_proj": (inter, hidden), "ffn.up_proj": (inter, hidden), "ffn.down_proj": (hidden, inter),
    }
    hf_layer = {
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
        "attn.v_proj": "self_attn.v_proj", "attn.o_proj": "self_attn.o_proj",
        "ffn.gate_proj": "mlp.gate_proj", "ffn.up_proj": "mlp.up_proj", "ffn.down_proj": "mlp.down_proj",
    }
    if config.get("qk_norm"):
        shapes |= {"attn.q_norm": (head_dim,), "attn.k_norm": (head_dim,)}
        hf_layer |= {"attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"}

    rules: list[TensorRule] = []
    for hf, canon, shape in [("model.embed_tokens.weight", "embed_tokens.weight", (vocab, hidden)),
                             ("model.norm.weight", "norm.weight", (hidden,))]:
        rules += [TensorRule(hf, canon, shape), TensorRule(canon, canon, shape)]
    for canon, hf in hf_layer.items():
        target = f"layers.{{i}}.{canon}.weight"
        rules += [TensorRule(f"model.layers.{{i}}.{hf}.weight", target, shapes[canon]),
                  TensorRule(target, target, shapes[canon])]
    rules.append(TensorRule("lm_head.weight", "lm_head.weight", (vocab, hidden),
                            optional=config.get("tie_word_embeddings", True) is not False))
    if config.get("attn_res"):
        for name in ["layers.{i}.attn_res_query", "layers.{i}.attn_res_norm.weight",
                     "layers.{i}.mlp_res_query", "layers.{i}.mlp_res_norm.weight",
                     "final_res_query", "final_res_norm.weight"]:
            rules.append(TensorRule(name, name, (hidden,)))
    return rules
