"""Llama family: SmolLM2 / Llama / Kotodama (QK-norm, Block Attention Residuals, tied embeddings).

One module serves all of them (specs/kotodama.md §12): plain Llama is Kotodama with `qk_norm` and
`attn_res` off. Per-request memory is paged KV only.

Canonical tensor names are the Kotodama module names (`layers.{i}.attn.q_proj.weight`, ...); the
checkpoint name maps in weights/ translate HF / GGUF / training-checkpoint names into them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from hybridserve.kernels.backend import pick
from hybridserve.models.batch import BatchMeta
from hybridserve.models.cache import CacheLayout, CacheView, KVSpec
from hybridserve.models.layers import (RopeTable, apply_rope, attention_o_applies, causal_attention, logit_rows,
                                       norm_attention, norm_attention_o,
                                       rms_norm, rope_cos_sin, rope_inv_freq, rope_params, swiglu, unique_bytes)


# A query's extra key/value (NanoHammer's state entry, built on a side stream) handed to the attention as a
# callable it takes just before its kernel (models/layers.py `take_entry`), so the stream's wait for the side
# stream comes after the layer's q|k|v GEMV and RoPE. Off: taken at the layer's start, where layer 0's GEMV
# waited for the whole first state chain (22 µs, bench/results/step_timeline_evict-h100.json) and every later
# q|k|v GEMV, behind a plain edge, launched only once the down GEMV before it had ended. NanoHammer batch 1 on an
# H100, on vs off: 1.067 vs 1.080 ms, 1.059 vs 1.077 (bench/results/decode_latency_entry_wait-h100.json,
# decode_latency_side-h100.json); batch 8 even. An A/B knob.
ENTRY_AT_ATTENTION = True


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    rope_scaling: dict | None = None
    qk_norm: bool = False
    attn_res: bool = False
    attn_res_boundaries: list[int] = field(default_factory=list)

    def cache_layout(self) -> CacheLayout:
        """Per-request memory follows from the config alone (also for `inspect`, before weights load)."""
        return CacheLayout(kv=KVSpec(self.num_layers, self.num_kv_heads, self.head_dim))

    @classmethod
    def from_hf(cls, c: dict) -> "LlamaConfig":
        heads = c["num_attention_heads"]
        attn_res = bool(c.get("attn_res", False))
        layers = c["num_hidden_layers"]
        bounds = c.get("attn_res_boundaries")
        if attn_res and not bounds:
            n = c.get("attn_res_n_blocks", 7)
            size = -(-layers // n)
            bounds = list(range(0, layers, size))
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rope_theta=rope_params(c)[0],
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
            rope_scaling=rope_params(c)[1],
            qk_norm=bool(c.get("qk_norm", False)),
            attn_res=attn_res,
            attn_res_boundaries=list(bounds or []),
        )


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def route(sources: list[torch.Tensor], query: torch.Tensor, norm_w: torch.Tensor, eps: float) -> torch.Tensor:
    """Block AttnRes routing (kernels/attn_res.py): softmax over depth of q·RMSNorm_w(src), in fp32."""
    return pick("attn_res", sources[0].device).route(sources, query, norm_w, eps)


class LlamaModel:
    """A pure function of (weights, batch metadata, cache view); it holds weights, never cache memory."""

    arch = "llama"

    @staticmethod
    def config_class():
        return LlamaConfig

    def __init__(self, config: LlamaConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        c = config

        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=self.device, dtype=dtype)

        self.embed = w("embed_tokens.weight")
        self.lm_head = self.embed if c.tie_word_embeddings or "lm_head.weight" not in weights else w("lm_head.weight")
        self.norm = w("norm.weight")
        self.layers = []
        for i in range(c.num_layers):
            p = f"layers.{i}."
            lw = {
                "attn_norm": w(p + "attn_norm.weight"),
                "qkv": torch.cat([w(p + f"attn.{x}_proj.weight") for x in "qkv"]),
                "o": w(p + "attn.o_proj.weight"),
                "ffn_norm": w(p + "ffn_norm.weight"),
                "gate_up": torch.cat([w(p + "ffn.gate_proj.weight"), w(p + "ffn.up_proj.weight")]),
                "down": w(p + "ffn.down_proj.weight"),
            }
            if c.qk_norm:
                lw["q_norm"], lw["k_norm"] = w(p + "attn.q_norm.weight"), w(p + "attn.k_norm.weight")
            if c.attn_res:
                for r in ("attn_res", "mlp_res"):
                    lw[r + "_query"] = w(p + r + "_query")
                    lw[r + "_norm"] = w(p + r + "_norm.weight")
            self.layers.append(lw)
        if c.attn_res:
            self.final_res_query = w("final_res_query")
            self.final_res_norm = w("final_res_norm.weight")
        self.inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling).to(self.device)
        self.rope_table = RopeTable(self.inv_freq, c.max_position_embeddings, dtype, self.device)
        self.scale = c.head_dim ** -0.5

    def cache_layout(self) -> CacheLayout:
        return self.config.cache_layout()

    @property
    def max_model_len(self) -> int:
        return self.config.max_position_embeddings

    def weights_bytes(self) -> int:
        return unique_bytes([self.embed, self.lm_head, self.norm] + [x for lw in self.layers for x in lw.values()])

    # -- the two entry points -------------------------------------------------------------------

    def reference_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Plain full-sequence forward of one sequence, no cache: logits [T, V]."""
        positions = torch.arange(input_ids.shape[0], device=self.device)
        h = self._hidden(input_ids.to(self.device), positions,
                         lambda i, q, k, v: causal_attention(q, k, v, self.scale))
        return self._logits(h)

    def forward(self, meta: BatchMeta, cache: CacheView) -> torch.Tensor:
        """Engine forward over a packed batch with paged KV: logits [len(logits_indices), V].

        The math of `_hidden` + `_logits`, arranged for the decode step's launch count: each RMSNorm
        (and, for plain Llama, the residual add before it) goes with the matmul after it, QK-norm, RoPE
        and the KV-page write are one kernel, SiLU·mul goes with the gate/up matmul, and with AttnRes each
        residual add into the partial goes with the routing after it (kernels/fused_triton.py,
        kernels/attn_res_triton.py). A batch-1 decode layer is 7 kernels (4 GEMVs, RoPE + KV write, the
        attention's split and merge), 9 with AttnRes (a route_add before each sublayer's first GEMV).
        A subclass whose queries also attend to one extra entry each supplies them through
        `_attention_entries` (NanoHammer's state entries)."""
        c, eps = self.config, self.config.rms_norm_eps
        fused = pick("fused", self.device)
        T, H = meta.input_ids.shape[0], c.num_heads
        cos, sin = self.rope_table(meta.positions, max(meta.seq_lens_cpu, default=0))
        # entries that do not read the embedding are queued before its gather
        early = not self._entries_need_embedding()
        entries = self._attention_entries(meta, None, cache, cos, sin) if early else None
        h = fused.gather_rows(self.embed, meta.input_ids)
        if not early:
            entries = self._attention_entries(meta, h, cache, cos, sin)

        # one kernel from the q|k|v projection through the o projection (models/layers.py ATTN_O), its fp32
        # outputs in one buffer zeroed at the step's start
        sums = (torch.zeros(len(self.layers), T, c.hidden_size, dtype=torch.float32, device=h.device)
                if not c.attn_res and attention_o_applies(meta) else None)

        def attention(i: int, lw: dict, h: torch.Tensor, delta: torch.Tensor | None):
            """(h + delta, the attention sublayer's output up to the o projection's) from the residual stream."""
            entry = (None if entries is None else functools.partial(entries.take, i) if ENTRY_AT_ATTENTION
                     else entries.take(i))
            if sums is not None:
                return norm_attention_o(h, delta, lw["attn_norm"], lw["qkv"], lw["o"], sums[i], cos, sin, H,
                                        cache.kv[i], meta, self.scale, lw.get("q_norm"), lw.get("k_norm"), eps, entry)
            h, o = norm_attention(h, delta, lw["attn_norm"], lw["qkv"], cos, sin, H, cache.kv[i], meta, self.scale,
                                  lw.get("q_norm"), lw.get("k_norm"), eps, entry, prefetch=(lw["o"], lw["gate_up"]))
            return h, fused.linear(o.reshape(T, -1), lw["o"], after_block=True)

        if not c.attn_res:
            delta = None                                   # the pending sublayer output, added with the next norm
            for i, lw in enumerate(self.layers):
                h, a = attention(i, lw, h, delta)
                h, g = fused.add_norm_linear_silu_mul(h, a, lw["ffn_norm"], lw["gate_up"], eps)
                delta = fused.linear(g, lw["down"])
        else:
            attn_res = pick("attn_res", self.device)
            committed, partial, delta = [], h, None        # delta: the MLP output not yet in the partial

            def add_route(partial, delta, query, norm_w):
                """(partial + delta, its routing): partial None is a fresh block, a zero partial, so the sum is
                delta itself; delta None adds nothing. One kernel, or none for a lone source."""
                if partial is None:
                    return delta, attn_res.route(committed + [delta], query, norm_w, eps)
                if delta is None:
                    return partial, attn_res.route(committed + [partial], query, norm_w, eps)
                return attn_res.route_add(committed + [partial], delta, query, norm_w, eps)

            for i, lw in enumerate(self.layers):
                partial, x = add_route(partial, delta, lw["attn_res_query"], lw["attn_res_norm"])
                if i in c.attn_res_boundaries:
                    committed.append(partial)
                    partial = None
                partial, x = add_route(partial, attention(i, lw, x, None)[1], lw["mlp_res_query"], lw["mlp_res_norm"])
                delta = fused.linear(fused.add_norm_linear_silu_mul(x, None, lw["ffn_norm"], lw["gate_up"], eps)[1],
                                     lw["down"])
            h = add_route(partial, delta, self.final_res_query, self.final_res_norm)[1]
            delta = None
        h, delta = logit_rows(meta, h, delta)
        return fused.add_norm_linear(h, delta, self.norm, self.lm_head, eps, out_dtype=torch.float32)[1]

    def _attention_entries(self, meta: BatchMeta, h: torch.Tensor | None, cache: CacheView, cos: torch.Tensor,
                           sin: torch.Tensor):
        """Per-layer extra key/value of each query (an object whose `take(i)` gives layer i's), or None:
        plain Llama has none. h, the step's embedded tokens, is None where `_entries_need_embedding` is False."""
        return None

    def _entries_need_embedding(self) -> bool:
        return True

    # -- shared body ----------------------------------------------------------------------------

    def _attention(self, i: int, lw: dict, x: torch.Tensor, cos, sin, attend: Attend) -> torch.Tensor:
        c = self.config
        T = x.shape[0]
        q, k, v = F.linear(x, lw["qkv"]).split(
            [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim], dim=-1)
        q = q.view(T, c.num_heads, c.head_dim)
        k = k.view(T, c.num_kv_heads, c.head_dim)
        v = v.view(T, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q = rms_norm(q, lw["q_norm"], c.rms_norm_eps)
            k = rms_norm(k, lw["k_norm"], c.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attend(i, q, k, v)
        return F.linear(o.reshape(T, -1), lw["o"])

    def _hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        c = self.config
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.dtype)
        h = self.embed[input_ids]
        if not c.attn_res:
            for i, lw in enumerate(self.layers):
                h = h + self._attention(i, lw, rms_norm(h, lw["attn_norm"], c.rms_norm_eps), cos, sin, attend)
                h = h + swiglu(rms_norm(h, lw["ffn_norm"], c.rms_norm_eps), lw["gate_up"], lw["down"])
            return h
        eps = c.rms_norm_eps
        committed, partial = [], h
        for i, lw in enumerate(self.layers):
            x = route(committed + [partial], lw["attn_res_query"], lw["attn_res_norm"], eps)
            if i in c.attn_res_boundaries:
                committed.append(partial)
                partial = torch.zeros_like(partial)
            partial = partial + self._attention(i, lw, rms_norm(x, lw["attn_norm"], eps), cos, sin, attend)
            x = route(committed + [partial], lw["mlp_res_query"], lw["mlp_res_norm"], eps)
            partial = partial + swiglu(rms_norm(x, lw["ffn_norm"], eps), lw["gate_up"], lw["down"])
        return route(committed + [partial], self.final_res_query, self.final_res_norm, eps)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(h, self.norm, self.config.rms_norm_eps), self.lm_head).float()
