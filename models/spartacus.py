"""Spartacus (NoesisLab/Spartacus-1B-Instruct): a Llama-style pre-norm decoder whose attention is a
monoid / gated-linear-attention recurrence with a per-key-dimension decay (specs/spartacus.md §1, §7).

No positions, no mask, no KV: each request keeps one fp32 state [H, d, d] per layer in a slot, so its
memory is fixed whatever the context length.

Canonical tensor names: `embed_tokens.weight`, `norm.weight`, `lm_head.weight` (absent = tied), and per
layer `layers.{i}.attn_norm.weight`, `layers.{i}.attn.{q,k,v,o,decay}_proj.weight`,
`layers.{i}.attn.decay_proj.bias` (optional), `layers.{i}.attn.{q,k}_norm.weight` ([d] per head or
[H*d] full width; the shape decides), `layers.{i}.ffn_norm.weight`, `layers.{i}.ffn.{gate,up,down}_proj.weight`.
weights/spartacus_map.py maps checkpoint names onto them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from hybridserve.kernels import monoid
from hybridserve.kernels.backend import pick
from hybridserve.kernels.spartacus_step import StepWeights
from hybridserve.models.batch import BatchMeta
from hybridserve.models.cache import CacheLayout, CacheView, StateSpec
from hybridserve.models.layers import logit_rows, rms_norm, swiglu, unique_bytes

DECAY_GATES = ("sigmoid", "neg_softplus", "scalar_sigmoid")


@dataclass
class SpartacusConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    decay_gate: str = "sigmoid"
    max_position_embeddings: int = 1 << 20   # no positions: only a serving limit

    def cache_layout(self) -> CacheLayout:
        return CacheLayout(states={"monoid": StateSpec(self.num_layers, (self.num_heads, self.head_dim,
                                                                         self.head_dim), torch.float32)})

    @classmethod
    def from_hf(cls, c: dict) -> "SpartacusConfig":
        heads = c["num_attention_heads"]
        gate = c.get("decay_gate", "sigmoid")
        if gate not in DECAY_GATES:
            raise ValueError(f"decay_gate {gate!r} is not one of {DECAY_GATES}")
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
            decay_gate=gate,
            max_position_embeddings=int(c.get("max_position_embeddings") or 1 << 20),
        )


# HYBRIDSERVE_STEP_KERNEL=1 runs a one-sequence decode step as one step function: on CUDA one persistent
# kernel (kernels/spartacus_step_triton.py), elsewhere its reference. Off by default: on an H100 it measured
# slower than the per-layer kernels (batch-1 graph 1.31 vs 1.20 ms, bench/results/step_kernel-h100.json).
STEP_KERNEL = os.environ.get("HYBRIDSERVE_STEP_KERNEL", "0") == "1"


def log_decay(z: torch.Tensor, decay_gate: str) -> torch.Tensor:
    """log α ≤ 0 in fp32 from the decay logits z [T, H, d] (or [T, H, 1] for scalar_sigmoid)."""
    if decay_gate == "neg_softplus":
        return -F.softplus(z.float())
    return F.logsigmoid(z.float())


# (layer index, q, k, v, log_a) -> o: the recurrence, from the reference loop or over the slot pool.
Mix = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SpartacusModel:
    """A pure function of (weights, batch metadata, cache view); it holds weights, never cache memory."""

    arch = "spartacus"

    @staticmethod
    def config_class():
        return SpartacusConfig

    def __init__(self, config: SpartacusConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        c = config

        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=self.device, dtype=dtype)

        self.embed = w("embed_tokens.weight")
        self.lm_head = self.embed if c.tie_word_embeddings or "lm_head.weight" not in weights else w("lm_head.weight")
        self.norm = w("norm.weight")
        width = c.num_heads * c.head_dim
        self.scale = c.head_dim ** -0.5
        gate_width = c.num_heads if c.decay_gate == "scalar_sigmoid" else width
        # each kind of layer weight lives in one [L, ...] tensor (the persistent decode-step kernel reads it
        # so); the per-layer entries are views into it
        stacked: dict[str, torch.Tensor | None] = {}

        def put(key: str, i: int, t: torch.Tensor) -> None:
            if key not in stacked:
                stacked[key] = torch.empty((c.num_layers, *t.shape), dtype=t.dtype, device=self.device)
            stacked[key][i].copy_(t)

        any_bias = any(f"layers.{i}.attn.decay_proj.bias" in weights for i in range(c.num_layers))
        for i in range(c.num_layers):
            p = f"layers.{i}."
            decay = weights[p + "attn.decay_proj.weight"]
            if decay.shape[0] != gate_width:
                raise ValueError(f"{p}attn.decay_proj.weight has {decay.shape[0]} outputs, but decay_gate="
                                 f"{c.decay_gate!r} needs {gate_width}")
            bias = weights.get(p + "attn.decay_proj.bias")
            if bias is None and any_bias:
                bias = torch.zeros(gate_width)      # other layers have one: z + 0 is z
            put("attn_norm", i, w(p + "attn_norm.weight"))
            # q, k, v and the decay logits come out of one matmul
            put("qkvz", i, torch.cat([w(p + f"attn.{x}_proj.weight") for x in ("q", "k", "v", "decay")]))
            if bias is not None:
                put("decay_bias", i, bias.to(device=self.device, dtype=torch.float32))
            put("q_norm", i, w(p + "attn.q_norm.weight"))
            # the engine path folds the q scale d^-1/2 into the norm weight (fp32: no extra rounding)
            put("q_norm_scaled", i, w(p + "attn.q_norm.weight").float() * self.scale)
            put("k_norm", i, w(p + "attn.k_norm.weight"))
            put("o", i, w(p + "attn.o_proj.weight"))
            put("ffn_norm", i, w(p + "ffn_norm.weight"))
            put("gate_up", i, torch.cat([w(p + "ffn.gate_proj.weight"), w(p + "ffn.up_proj.weight")]))
            put("down", i, w(p + "ffn.down_proj.weight"))
        stacked.setdefault("decay_bias", None)
        self.layers = [{k: (None if t is None else t[i]) for k, t in stacked.items()} for i in range(c.num_layers)]
        self.step_weights = StepWeights(
            embed=self.embed, attn_norm=stacked["attn_norm"], qkvz=stacked["qkvz"], q_norm=stacked["q_norm_scaled"],
            k_norm=stacked["k_norm"], decay_bias=stacked["decay_bias"], o=stacked["o"], ffn_norm=stacked["ffn_norm"],
            gate_up=stacked["gate_up"], down=stacked["down"], norm=self.norm, lm_head=self.lm_head,
            num_heads=c.num_heads, head_dim=c.head_dim, eps=c.rms_norm_eps, decay_gate=c.decay_gate)
        self.qkvz_sizes = [width, width, width, gate_width]

    def cache_layout(self) -> CacheLayout:
        return self.config.cache_layout()

    @property
    def max_model_len(self) -> int:
        return self.config.max_position_embeddings

    def weights_bytes(self) -> int:
        return unique_bytes([self.embed, self.lm_head, self.norm] + [x for lw in self.layers for x in lw.values()])

    # -- the two entry points -------------------------------------------------------------------

    def reference_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Plain full-sequence forward of one sequence from the zero state: logits [T, V]."""
        h = self._hidden(input_ids.to(self.device), lambda _, q, k, v, a: monoid.naive(q, k, v, a)[0])
        return self._logits(h)

    def forward(self, meta: BatchMeta, cache: CacheView) -> torch.Tensor:
        """Engine forward over a packed batch; each sequence continues from, and updates, its slot.

        The same math as `_hidden` + `_logits`, with the per-layer glue fused for the decode step's
        launch count: each residual add and RMSNorm go with the matmul after them (one GEMV kernel at
        batch 1, kernels/fused_triton.py), and q/k norms, SiLU, the q scale and the decay gate are one
        kernel that reads the qkvz row and leaves v in place; in a decode step that kernel is the
        recurrence itself (monoid `projection_decode`: the projection, then `fused_decode`; with its
        PROJECTION_FUSED knob, at batch 1, each head's last qkvz GEMV program to finish steps that head). With
        STEP_KERNEL a CUDA decode step of one sequence is all of this in one persistent kernel
        (kernels/spartacus_step_triton.py, same arithmetic)."""
        c, eps = self.config, self.config.rms_norm_eps
        pools = cache.states["monoid"]
        if meta.is_decode and meta.num_tokens == 1 and STEP_KERNEL:
            return pick("spartacus_step", self.device).decode_step(self.step_weights, meta.input_ids,
                                                                    meta.slot_ids, pools)
        fused, ops = pick("fused", self.device), pick("monoid", self.device)
        # the residual stream and the pending sublayer output
        h, delta = fused.gather_rows(self.embed, meta.input_ids), None
        for i, lw in enumerate(self.layers):
            norms = (lw["q_norm_scaled"], lw["k_norm"], lw["decay_bias"], c.num_heads, c.head_dim, eps,
                     c.decay_gate)
            if meta.is_decode:    # the glue goes into the recurrence kernel
                h, o = ops.projection_decode(h, delta, lw["attn_norm"], lw["qkvz"], *norms, pools[i], meta.slot_ids,
                                             prefetch=lw["o"])
            else:
                h, qkvz = fused.add_norm_linear(h, delta, lw["attn_norm"], lw["qkvz"], eps)
                q, k, v, log_a = fused.monoid_prep(qkvz, *norms)
                o = ops.varlen_prefill(q, k, v, log_a, meta.cu_seqlens, pools[i], meta.slot_ids)
            o = fused.linear(o.reshape(o.shape[0], -1), lw["o"], after_block=True)
            h, g = fused.add_norm_linear_silu_mul(h, o, lw["ffn_norm"], lw["gate_up"], eps)
            delta = fused.linear(g, lw["down"])
        h, delta = logit_rows(meta, h, delta)
        return fused.add_norm_linear(h, delta, self.norm, self.lm_head, eps, out_dtype=torch.float32)[1]

    def reference_attention(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer i's monoid attention sublayer on normed input x [T, hidden], one sequence from the zero
        state; the unit the layer-level anchor test checks against the card's element equation."""
        return self._attention(i, x, lambda _, q, k, v, a: monoid.naive(q, k, v, a)[0])

    # -- shared body ----------------------------------------------------------------------------

    def _head_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """q/k RMSNorm per head ([d] weight) or over the full width ([H*d] weight); x [T, H*d] -> [T, H, d]."""
        c = self.config
        T = x.shape[0]
        if weight.numel() == c.head_dim:
            return rms_norm(x.view(T, c.num_heads, c.head_dim), weight, c.rms_norm_eps)
        return rms_norm(x, weight, c.rms_norm_eps).view(T, c.num_heads, c.head_dim)

    def _attention(self, i: int, x: torch.Tensor, mix: Mix) -> torch.Tensor:
        c, lw = self.config, self.layers[i]
        T = x.shape[0]
        q, k, v, z = F.linear(x, lw["qkvz"]).split(self.qkvz_sizes, dim=-1)
        q = self._head_norm(q, lw["q_norm"]) * self.scale
        k = F.silu(self._head_norm(k, lw["k_norm"]))
        v = v.view(T, c.num_heads, c.head_dim)
        z = z.float().view(T, c.num_heads, self.qkvz_sizes[3] // c.num_heads)
        if lw["decay_bias"] is not None:
            z = z + lw["decay_bias"].view(c.num_heads, -1)
        # a per-head gate (scalar_sigmoid) is the same decay on every key dim
        log_a = log_decay(z, c.decay_gate).expand(T, c.num_heads, c.head_dim).contiguous()
        o = mix(i, q, k, v, log_a)
        return F.linear(o.reshape(T, -1), lw["o"])

    def _hidden(self, input_ids: torch.Tensor, mix: Mix) -> torch.Tensor:
        c = self.config
        h = self.embed[input_ids]
        for i, lw in enumerate(self.layers):
            h = h + self._attention(i, rms_norm(h, lw["attn_norm"], c.rms_norm_eps), mix)
            h = h + swiglu(rms_norm(h, lw["ffn_norm"], c.rms_norm_eps), lw["gate_up"], lw["down"])
        return h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(h, self.norm, self.config.rms_norm_eps), self.lm_head).float()
