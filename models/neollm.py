"""NeoLLM 110M (KitsuVp/NeoLLM @ 04da2a7b): Gated DeltaNet : attention = 3 : 1, FAN, PolyNorm, LNS, GPAS.

Per layer l (specs/neollm.md §5), with LNS factor s_l = 1/√(l+1) and GPAS gate(s) γ:
    h = RMSNorm_in(x)·s_l;    x = (x + Mixer_l(FAN?(h)))·(1 − silu(γ_attn))
    h = RMSNorm_post(x)·s_l;  x = (x + MLP(h))·(1 − silu(γ_mlp))
Mixer is GQA attention with q/k-norm and partial RoPE on `full_attention` layers, else a Gated DeltaNet
layer (models/gated_deltanet.py). Then a final RMSNorm and the tied head.

The checkpoint variant (attention output gate, FAN placement, MLP width, GPAS gate count, RMSNorm form,
LNS form) is decided by the loader from tensor shapes and values (weights/neollm_map.py) and arrives here
as config fields. Canonical tensor names are the HF names without the `model.` prefix, except the FAN
linear (`layers.{i}.fan.*`), PolyNorm (`layers.{i}.mlp.poly_norm.*`) and the GPAS gates
(`layers.{i}.gpas_attn`, `layers.{i}.gpas_mlp`; one shared checkpoint gate binds to both).

Per-request memory: paged KV for the attention layers, and per GDN layer a recurrent state (fp32) and a
conv window (model dtype) in the "gdn" and "conv" slot groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hybridserve.kernels.backend import pick
from hybridserve.kernels.neollm_ops import fan, poly_norm
from hybridserve.models import gated_deltanet as gdn
from hybridserve.models.batch import BatchMeta
from hybridserve.models.cache import CacheLayout, CacheView, KVSpec, StateSpec
from hybridserve.models.layers import (RopeTable, apply_rope, attention_step, causal_attention, logit_rows, padded_rows,
                                       rms_norm, rope_cos_sin, rope_inv_freq, rope_params, unique_bytes)

FULL, LINEAR = "full_attention", "linear_attention"


@dataclass
class NeoLLMConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: list[str]
    linear_num_key_heads: int = 8
    linear_num_value_heads: int = 16
    linear_key_head_dim: int = 32
    linear_value_head_dim: int = 32
    linear_conv_kernel_dim: int = 4
    partial_rotary_factor: float = 0.25
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    fan_ratio: float = 0.125
    # variant switches, filled by weights/neollm_map.infer_neollm_variant; defaults = the spec's best fit
    attn_output_gate: bool = False
    fan_placement: str = "all"            # "none" | "full_attention" | "linear_attention" | "all"
    zero_centered_norm: bool = True       # RMSNorm weights used as (1 + w), Qwen3-Next style (not GDN's gated norm)
    lns_forward: bool = True              # False when the norm weights already hold 1/√(l+1)

    def cache_layout(self) -> CacheLayout:
        n_attn = sum(t == FULL for t in self.layer_types)
        n_gdn = len(self.layer_types) - n_attn
        d = self.gdn_dims
        return CacheLayout(
            kv=KVSpec(n_attn, self.num_kv_heads, self.head_dim) if n_attn else None,
            states={"gdn": StateSpec(n_gdn, d.state_shape, torch.float32), "conv": StateSpec(n_gdn, d.window_shape)}
            if n_gdn else {},
        )

    @classmethod
    def from_hf(cls, c: dict) -> NeoLLMConfig:
        layers = c["num_hidden_layers"]
        heads = c["num_attention_heads"]
        types = c.get("layer_types") or [FULL if (i + 1) % 4 == 0 else LINEAR for i in range(layers)]
        if len(types) != layers or set(types) - {FULL, LINEAR}:
            raise ValueError(f"layer_types must be {layers} of {FULL!r}/{LINEAR!r}, got {types}")
        fields = {k: c[k] for k in (
            "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
            "linear_conv_kernel_dim", "partial_rotary_factor", "rope_theta", "rms_norm_eps",
            "max_position_embeddings", "tie_word_embeddings", "fan_ratio", "attn_output_gate", "fan_placement",
            "zero_centered_norm", "lns_forward") if k in c}
        theta, _, partial = rope_params(c)
        fields["rope_theta"] = theta
        if partial is not None:
            fields["partial_rotary_factor"] = partial
        return cls(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            intermediate_size=c.get("intermediate_size", 1024), num_layers=layers, num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads, layer_types=list(types), **fields)

    @property
    def gdn_dims(self) -> gdn.GDNDims:
        return gdn.GDNDims(self.hidden_size, self.linear_num_key_heads, self.linear_num_value_heads,
                           self.linear_key_head_dim, self.linear_value_head_dim, self.linear_conv_kernel_dim,
                           self.rms_norm_eps)

    @property
    def fan_sizes(self) -> tuple[int, int]:
        """(p, g): FAN's periodic width and plain width; the FAN output cat(cos P, sin P, G) is hidden wide."""
        p = int(self.hidden_size * self.fan_ratio)
        return p, self.hidden_size - 2 * p

    def has_fan(self, layer: int) -> bool:
        return self.fan_placement in ("all", self.layer_types[layer])


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Recur = Callable[[int, torch.Tensor, gdn.GDNWeights], torch.Tensor]


class NeoLLMModel:
    """A pure function of (weights, batch metadata, cache view); it holds weights, never cache memory."""

    arch = "neollm"

    @staticmethod
    def config_class():
        return NeoLLMConfig

    def __init__(self, config: NeoLLMConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        c = config
        self.gdn_dims = c.gdn_dims

        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=self.device, dtype=dtype)

        def norm_weight(name: str, lns: float = 1.0) -> torch.Tensor:
            """The effective RMSNorm weight in fp32: the (1 + w) form and the LNS factor folded in once."""
            base = weights[name].to(device=self.device, dtype=torch.float32)
            return ((1.0 + base) if c.zero_centered_norm else base) * lns

        def gpas(name: str) -> float:
            """GPAS at inference: x ← x − silu(γ)·x, i.e. a fixed scale 1 − silu(γ)."""
            return 1.0 - F.silu(weights[name].float()).item()

        self.embed = w("embed_tokens.weight")
        tied = c.tie_word_embeddings or "lm_head.weight" not in weights
        # the head's multi-row products run against a row-padded copy (layers.padded_rows; the vocabulary,
        # 151,665 words, is odd); tied, the embedding is a view of the same buffer
        self.lm_head, self.lm_head_padded = padded_rows(self.embed if tied else w("lm_head.weight"))
        if tied:
            self.embed = self.lm_head
        self.norm = norm_weight("norm.weight")
        self.layers = []
        for i, kind in enumerate(c.layer_types):
            p = f"layers.{i}."
            lns = (i + 1) ** -0.5 if c.lns_forward else 1.0
            lw = {
                "in_norm": norm_weight(p + "input_layernorm.weight", lns),
                "post_norm": norm_weight(p + "post_attention_layernorm.weight", lns),
                "gate_up": torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")]),
                "down": w(p + "mlp.down_proj.weight"),
                "poly_w": w(p + "mlp.poly_norm.weight"), "poly_b": w(p + "mlp.poly_norm.bias"),
                "gpas_attn": gpas(p + "gpas_attn"), "gpas_mlp": gpas(p + "gpas_mlp"),
            }
            if c.has_fan(i):
                lw["fan_w"], lw["fan_b"] = w(p + "fan.weight"), w(p + "fan.bias")
            if kind == FULL:
                # q_proj rows are per head [query | gate] when gated (Qwen3-Next); they are regrouped once
                # into [all queries | k | v | all gates], so the q/k/v heads sit at one stride for the
                # engine's fused norm + RoPE + KV-write kernel
                q = w(p + "self_attn.q_proj.weight")
                q, *gate = q.view(c.num_heads, -1, c.hidden_size).split(c.head_dim, dim=1)
                lw["qkv"] = torch.cat([q.reshape(-1, c.hidden_size), w(p + "self_attn.k_proj.weight"),
                                       w(p + "self_attn.v_proj.weight"), *(g.reshape(-1, c.hidden_size) for g in gate)])
                lw["o"] = w(p + "self_attn.o_proj.weight")
                lw["q_norm"] = norm_weight(p + "self_attn.q_norm.weight")
                lw["k_norm"] = norm_weight(p + "self_attn.k_norm.weight")
            else:
                lw["gdn"] = gdn.load_weights(weights, p + "linear_attn.", self.gdn_dims, dtype, self.device)
            self.layers.append(lw)
        self.attn_index = {i: j for j, i in enumerate(i for i, t in enumerate(c.layer_types) if t == FULL)}
        self.gdn_index = {i: j for j, i in enumerate(i for i, t in enumerate(c.layer_types) if t == LINEAR)}
        self.inv_freq = rope_inv_freq(int(c.head_dim * c.partial_rotary_factor), c.rope_theta).to(self.device)
        self.rope_table = RopeTable(self.inv_freq, c.max_position_embeddings, dtype, self.device)
        self.scale = c.head_dim ** -0.5

    def cache_layout(self) -> CacheLayout:
        return self.config.cache_layout()

    @property
    def max_model_len(self) -> int:
        return self.config.max_position_embeddings

    def weights_bytes(self) -> int:
        tensors = [self.embed, self.lm_head, self.norm]
        for lw in self.layers:
            for v in lw.values():
                if isinstance(v, torch.Tensor):
                    tensors.append(v)
                elif isinstance(v, gdn.GDNWeights):
                    tensors += v.tensors()
        return unique_bytes(tensors)

    # -- the two entry points -------------------------------------------------------------------

    def reference_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Plain full-sequence forward of one sequence, no cache: logits [T, V]."""
        positions = torch.arange(input_ids.shape[0], device=self.device)
        h = self._hidden(input_ids.to(self.device), positions,
                         lambda j, q, k, v: causal_attention(q, k, v, self.scale),
                         lambda m, x, w: gdn.reference(x, w, self.gdn_dims))
        return self._logits(h)

    def forward(self, meta: BatchMeta, cache: CacheView) -> torch.Tensor:
        """Engine forward over a packed batch: paged KV for attention, state slots for GDN layers.

        The math of `_hidden` + `_logits`, arranged for few launches (kernels/neollm_ops*.py): each GPAS
        residual add and RMSNorm go into the matmul after them (a GEMV at decode), with FAN's bias and
        cos/sin on its outputs; PolyNorm·u goes into the down projection; a GDN decode step between its
        projections is one kernel; q/k norms, partial RoPE and the KV write are one kernel before attention."""
        c, eps = self.config, self.config.rms_norm_eps
        ops, fused = pick("neollm_ops", self.device), pick("fused", self.device)
        p, _ = c.fan_sizes
        cos, sin = self.rope_table(meta.positions, max(meta.seq_lens_cpu, default=0))
        # the residual stream, the pending sublayer output, and the GPAS scale that goes with it
        h, delta, scale = fused.gather_rows(self.embed, meta.input_ids), None, 1.0
        for i, lw in enumerate(self.layers):
            attn = c.layer_types[i] == FULL
            w_in = lw["qkv"] if attn else lw["gdn"].in_proj
            if "fan_w" in lw:
                h, x = ops.add_scale_norm_linear(h, delta, scale, lw["in_norm"], lw["fan_w"], eps, lw["fan_b"], p)
                x = fused.linear(x, w_in)
            else:
                h, x = ops.add_scale_norm_linear(h, delta, scale, lw["in_norm"], w_in, eps)
            if attn:
                o = self._paged_attention(self.attn_index[i], lw, x, cos, sin, meta, cache)
                mixed = fused.linear(o, lw["o"])
            else:
                m = self.gdn_index[i]
                y = gdn.mix(x, lw["gdn"], self.gdn_dims, meta, cache.states["conv"][m], cache.states["gdn"][m])
                mixed = fused.linear(y, lw["gdn"].out_proj)
            h, gu = ops.add_scale_norm_linear(h, mixed, lw["gpas_attn"], lw["post_norm"], lw["gate_up"], eps)
            delta, scale = ops.poly_mul_linear(gu, lw["poly_w"], lw["poly_b"], lw["down"]), lw["gpas_mlp"]
        h, delta = logit_rows(meta, h, delta)
        return ops.add_scale_norm_linear(h, delta, scale, self.norm, self.lm_head, eps, out_dtype=torch.float32,
                                         padded_weight=self.lm_head_padded)[1]

    def _paged_attention(self, j: int, lw: dict, qkv: torch.Tensor, cos, sin, meta: BatchMeta,
                         cache: CacheView) -> torch.Tensor:
        """`_attention` between its projections on the engine path: qkv [T, ·] → o [T, H·D] for o_proj."""
        c = self.config
        T, H, D = qkv.shape[0], c.num_heads, c.head_dim
        heads = H + 2 * c.num_kv_heads
        o = attention_step(qkv[:, :heads * D].view(T, heads, D), cos, sin, H, cache.kv[j], meta, self.scale,
                           lw["q_norm"], lw["k_norm"], c.rms_norm_eps)
        if c.attn_output_gate:
            o = o * torch.sigmoid(qkv[:, heads * D:].view(T, H, D))
        return o.reshape(T, H * D)

    # -- shared body ----------------------------------------------------------------------------

    def _attention(self, j: int, lw: dict, x: torch.Tensor, cos, sin, attend: Attend) -> torch.Tensor:
        c = self.config
        T = x.shape[0]
        q_width = c.num_heads * c.head_dim
        kv_width = c.num_kv_heads * c.head_dim
        gate_width = q_width if c.attn_output_gate else 0
        q, k, v, gate = F.linear(x, lw["qkv"]).split([q_width, kv_width, kv_width, gate_width], dim=-1)
        q = rms_norm(q.view(T, c.num_heads, c.head_dim), lw["q_norm"], c.rms_norm_eps)
        k = rms_norm(k.view(T, c.num_kv_heads, c.head_dim), lw["k_norm"], c.rms_norm_eps)
        v = v.view(T, c.num_kv_heads, c.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attend(j, q, k, v)
        if c.attn_output_gate:
            o = o * torch.sigmoid(gate.view(T, c.num_heads, c.head_dim))
        return F.linear(o.reshape(T, -1), lw["o"])

    def _mlp(self, lw: dict, h: torch.Tensor) -> torch.Tensor:
        g, u = F.linear(h, lw["gate_up"]).chunk(2, dim=-1)
        return F.linear(poly_norm(g, lw["poly_w"], lw["poly_b"]) * u, lw["down"])

    def _hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend, recur: Recur):
        c = self.config
        eps = c.rms_norm_eps
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.dtype)
        p, _ = c.fan_sizes
        x = self.embed[input_ids]
        for i, lw in enumerate(self.layers):
            h = rms_norm(x, lw["in_norm"], eps)               # LNS is folded into in_norm
            if "fan_w" in lw:
                h = fan(h, lw["fan_w"], lw["fan_b"], p)
            if c.layer_types[i] == FULL:
                mixed = self._attention(self.attn_index[i], lw, h, cos, sin, attend)
            else:
                mixed = recur(self.gdn_index[i], h, lw["gdn"])
            x = (x + mixed) * lw["gpas_attn"]
            x = (x + self._mlp(lw, rms_norm(x, lw["post_norm"], eps))) * lw["gpas_mlp"]
        return x

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(h, self.norm, self.config.rms_norm_eps), self.lm_head).float()
