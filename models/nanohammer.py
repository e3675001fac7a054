"""NanoHammer: a Llama-3.2 backbone whose every query also attends to its own recurrent "state token".

This is hybridserve's causal reconstruction (specs/nanohammer.md §1, §7.2–7.4; everything beyond the
backbone is [reconstruction]). Per token t:

  w_t = token_to_state(e_t)                     e_t = token embedding
  I_t = I_{t-1} + HoloRoPE(w_t, t)              the only per-request state (fp32, one slot)
  s^0_t = HoloRoPE^{-1}(I_t, t)
  s^l_t = PostNorm^l(s^{l-1}_t + α^l ⊙_head MLP^l(PreNorm^l(s^{l-1}_t)))     one Euler step per layer
  r^l_t = state_projection^l(s^l_t)

In layer l, query t attends to [state entry of r^l_t] + tokens ≤ t. The state entry goes through the
layer's input_layernorm and k/v projections, its key is rotated at the query's own position, and it is
never cached: it is rebuilt every step from I and merged into paged attention through the log-sum-exp.

Reconstruction choices made here (§6.2 leaves them open): the cell MLP is fc2(SiLU(fc1(x))) on the full
state vector; PreNorm and PostNorm are RMSNorm over the whole state vector with a weight and the
backbone's eps; α is used as stored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from hybridserve.kernels.state_token import (HOLO_BASE, decode_integral, holo_rope, holo_rope_inv,
                                             integral_reference, merge_state_entry, state_logit,
                                             varlen_integral)
from hybridserve.models.batch import BatchMeta
from hybridserve.models.cache import CacheLayout, CacheView, StateSpec
from hybridserve.models.layers import apply_rope, paged_attention, rms_norm, rope_cos_sin
from hybridserve.models.llama import LlamaConfig, LlamaModel


@dataclass
class NanoHammerConfig(LlamaConfig):
    state_intermediate_size: int = field(kw_only=True)   # cell MLP width: only the checkpoint shapes say
    state_hidden_size: int = 512
    state_num_heads: int = 16                            # α width; each head scales its own slice
    holo_base: float = HOLO_BASE
    state_norm: str = "rmsnorm"                          # the only kind implemented (see module docstring)

    @classmethod
    def from_hf(cls, c: dict) -> "NanoHammerConfig":
        cfg = cls(
            **vars(LlamaConfig.from_hf(c)),
            state_intermediate_size=int(c["state_intermediate_size"]),
            state_hidden_size=int(c.get("state_hidden_size", 512)),
            state_num_heads=int(c.get("state_num_heads", 16)),
            holo_base=float(c.get("holo_rope_base", HOLO_BASE)),
            state_norm=c.get("state_norm", "rmsnorm"),
        )
        if cfg.state_norm != "rmsnorm":
            raise ValueError(f"NanoHammer state_norm {cfg.state_norm!r} is not implemented (only 'rmsnorm')")
        if cfg.state_hidden_size % cfg.state_num_heads:
            raise ValueError(f"state_hidden_size {cfg.state_hidden_size} is not a multiple of "
                             f"state_num_heads {cfg.state_num_heads}")
        return cfg


class NanoHammerModel(LlamaModel):
    arch = "nanohammer"

    @staticmethod
    def config_class():
        return NanoHammerConfig

    def __init__(self, config: NanoHammerConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        super().__init__(config, weights, dtype, device)

        def w(name: str) -> torch.Tensor | None:
            return weights[name].to(device=self.device, dtype=dtype) if name in weights else None

        self.token_to_state = (w("token_to_state.weight"), w("token_to_state.bias"))
        self.state_layers = []
        for i in range(config.num_layers):
            p = f"layers.{i}."
            self.state_layers.append({
                "pre_norm": w(p + "state_cell.pre_norm.weight"),
                "fc1": w(p + "state_cell.mlp.fc1.weight"), "fc1_bias": w(p + "state_cell.mlp.fc1.bias"),
                "fc2": w(p + "state_cell.mlp.fc2.weight"), "fc2_bias": w(p + "state_cell.mlp.fc2.bias"),
                "alpha": w(p + "state_cell.alpha"),
                "post_norm": w(p + "state_cell.post_norm.weight"),
                "proj": w(p + "state_projection.weight"), "proj_bias": w(p + "state_projection.bias"),
            })

    def cache_layout(self) -> CacheLayout:
        """Backbone paged KV plus I; the position counter is the request's own position, so nothing else."""
        layout = super().cache_layout()
        return CacheLayout(kv=layout.kv,
                           states={"integral": StateSpec(1, (self.config.state_hidden_size,), torch.float32)})

    def weights_bytes(self) -> int:
        state = [t for t in self.token_to_state if t is not None]
        state += [t for sl in self.state_layers for t in sl.values() if t is not None]
        return super().weights_bytes() + sum(t.numel() * t.element_size() for t in state)

    # -- the two entry points -------------------------------------------------------------------

    def reference_forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The definition, one sequence, no cache: query t's softmax runs over the explicit key set
        [state entry of t] + tokens ≤ t (an O(T²) loop). Logits [T, V]."""
        c = self.config
        input_ids = input_ids.to(self.device)
        T = input_ids.shape[0]
        positions = torch.arange(T, device=self.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.dtype)
        state_tokens = self._state_tokens(input_ids, positions, integral_reference)
        rep = c.num_heads // c.num_kv_heads

        def attend(i, q, k, v):
            k_s, v_s = self._state_kv(i, state_tokens[i], cos, sin)
            out = torch.empty_like(q)
            for t in range(T):
                keys = k[:t + 1].repeat_interleave(rep, dim=1).float()           # [t+1, H, D]
                values = torch.cat([v_s[t:t + 1], v[:t + 1]]).repeat_interleave(rep, dim=1).float()
                # the state entry's logit goes through state_logit, the one place a test can mask it
                logits = torch.cat([state_logit(q[t:t + 1], k_s[t:t + 1], self.scale).T,
                                    torch.einsum("hd,nhd->hn", q[t].float(), keys) * self.scale], dim=1)
                out[t] = torch.einsum("hn,nhd->hd", logits.softmax(-1), values).to(q.dtype)
            return out

        return self._logits(self._hidden(input_ids, positions, attend))

    def forward(self, meta: BatchMeta, cache: CacheView) -> torch.Tensor:
        """Engine forward: state prologue from the carried I, then paged attention merged with each
        query's state entry. Logits [len(logits_indices), V]."""
        pool = cache.states["integral"][0]
        if meta.is_decode:
            integrate = partial(decode_integral, state_pool=pool, slot_ids=meta.slot_ids)
        else:
            integrate = partial(varlen_integral, cu_seqlens=meta.cu_seqlens, state_pool=pool,
                                slot_ids=meta.slot_ids)
        state_tokens = self._state_tokens(meta.input_ids, meta.positions, integrate)
        cos, sin = rope_cos_sin(meta.positions, self.inv_freq, self.dtype)

        def attend(i, q, k, v):
            o_c, lse = paged_attention(q, k, v, cache.kv[i], meta, self.scale, return_lse=True)
            k_s, v_s = self._state_kv(i, state_tokens[i], cos, sin)
            return merge_state_entry(o_c, lse, q, k_s, v_s, self.scale)

        h = self._hidden(meta.input_ids, meta.positions, attend)
        return self._logits(h[meta.logits_indices])

    # -- state path -----------------------------------------------------------------------------

    def _state_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor, integrate) -> list[torch.Tensor]:
        """r^l_t for every layer (§7.2). They depend only on embeddings and positions, so the whole
        chain runs as one prologue before the backbone. `integrate` maps u [T, S] to I [T, S]."""
        c = self.config
        w = F.linear(self.embed[input_ids], *self.token_to_state).float()
        s = holo_rope_inv(integrate(holo_rope(w, positions, c.holo_base)), positions, c.holo_base)
        tokens = []
        for sl in self.state_layers:
            s = self._state_cell(sl, s)
            tokens.append(F.linear(s.to(self.dtype), sl["proj"], sl["proj_bias"]))
        return tokens

    def _state_cell(self, sl: dict, s: torch.Tensor) -> torch.Tensor:
        """One multi-head Euler step; the state stream stays fp32, the matmuls run in the model dtype."""
        c = self.config
        x = rms_norm(s, sl["pre_norm"], c.rms_norm_eps).to(self.dtype)
        update = F.linear(F.silu(F.linear(x, sl["fc1"], sl["fc1_bias"])), sl["fc2"], sl["fc2_bias"]).float()
        update = (sl["alpha"].float()[:, None] * update.view(-1, c.state_num_heads,
                                                             c.state_hidden_size // c.state_num_heads))
        return rms_norm(s + update.flatten(1), sl["post_norm"], c.rms_norm_eps)

    def _state_kv(self, i: int, r: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The state entry's key (RoPE at the query's own position) and value [T, Hkv, D]; no query."""
        c = self.config
        lw = self.layers[i]
        kv_weight = lw["qkv"][c.num_heads * c.head_dim:]
        x = rms_norm(r, lw["attn_norm"], c.rms_norm_eps)
        k, v = F.linear(x, kv_weight).view(-1, 2, c.num_kv_heads, c.head_dim).unbind(1)
        return apply_rope(k, cos, sin), v
