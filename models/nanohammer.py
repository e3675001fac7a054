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
never cached: it is rebuilt every step from I and joins the paged attention as one extra key (a decode
step seeds the attention kernel's softmax with it; prefill merges it through the log-sum-exp).

Reconstruction choices made here (§6.2 leaves them open): the cell MLP is fc2(SiLU(fc1(x))) on the full
state vector; PreNorm and PostNorm are RMSNorm over the whole state vector with a weight and the
backbone's eps; α is used as stored.

The engine path builds each layer's state entry from the folded weight [W_kv·diag(norm)·W_p; W_pᵀW_p/N]
(kernels/state_token.py, FOLD_ENTRY): one GEMV and an epilogue instead of the projection, the norm and the
k/v projection, a quarter of their weight bytes on the side stream that shares bandwidth with the backbone.
reference_forward keeps the unfolded definition. token_to_state is likewise applied to the whole vocabulary at
load (TOKEN_STATE_TABLE), so the engine path gathers a token's row instead of projecting its embedding.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hybridserve.kernels.backend import pick
from hybridserve.kernels.state_token import (HOLO_BASE, fold_entry_weights, holo_rope, holo_rope_inv, holo_theta,
                                             integral_reference, state_logit, token_state_table, varlen_integral)
from hybridserve.models.batch import BatchMeta
from hybridserve.models.cache import CacheLayout, CacheView, StateSpec
from hybridserve.models.layers import apply_rope, rms_norm, rope_cos_sin
from hybridserve.models.llama import LlamaConfig, LlamaModel


# Run the state entries' chain on a side stream beside the backbone (GPU). Off: the same kernels in line,
# before the first layer (an A/B knob for bench/decode_latency.py).
SIDE_STREAM = True

# The side stream's kernels launched without programmatic dependent launch (kernels/pdl.py `without`), each once
# the kernel before it has finished. H100, five rounds in turn, against all with it: batch 1 1.021 vs 1.044 ms and
# 1.024 vs 1.046, batch 8 1.337 vs 1.347 and 1.338 vs 1.348 (bench/results/decode_latency_side_plain-h100.json,
# _side_plain2-h100.json). Only the chain's first kernel without it: 1.047 vs 1.045 (_side_first-h100.json).
# An A/B knob.
SIDE_PLAIN = True

# Build each layer's state entry from one GEMV against a folded weight (kernels/state_token.py): the
# projection, input norm and k/v projection composed at load time, 1/4 of their weight bytes per layer at
# full size, read on the side stream. Off: the unfolded chain (projection → norm → k/v → RoPE), 4 kernels.
# Read at construction (a model built with it off has no fold and keeps the chain) and at each forward.
FOLD_ENTRY = True


# token_to_state of every vocabulary entry's embedding, formed at load (kernels/state_token.py
# `token_state_table`; [V, S] in the model dtype, 131 MB for the full-size model's 128256 × 512 in bf16): a
# token's projection is then a row gather, and the state chain no longer waits for the embedding gather nor
# reads the projection's 2 MB. Read at construction (built or not) and at each forward (used or not). H100,
# five rounds: batch 1 1.051 vs 1.059 ms, batch 8 1.361 vs 1.369 (bench/results/decode_latency_chain3-h100.json).
TOKEN_STATE_TABLE = True

# With the token table the chain does not read the embedding, so it is queued before its gather. Off: after it,
# batch 1 1.058 ms against 1.051, batch 8 even (decode_latency_chain3-h100.json). Queued before the RoPE rows
# too, with the side stream's own, it was slower: batch 1 1.091 vs 1.059 ms and batch 8 1.51 vs 1.44 on an H100
# (bench/results/decode_latency_chain2-h100.json); the graph then launched the whole side chain ahead of the
# backbone.
ENTRIES_BEFORE_GATHER = True

# A decode step's chain in the cell kernels (kernels/state_token_triton.py `decode_state_chain`): the readout
# inside the first two, each layer's folded GEMV inside the one that finishes its state. Layer 0's entry is then
# 4 kernels from the step's start (with the table) instead of 7. Off: the readout and the fold GEMVs as their own
# kernels, batch 1 1.061 ms against 1.051 (decode_latency_chain3-h100.json). An A/B knob.
DECODE_CHAIN = True

# A decode step's token_to_state projection as the side GEMV (kernels/fused*.py `linear`, on PDL) with its bias
# added by the readout kernel, instead of F.linear (a cuBLAS kernel of ~6 µs on an H100 at the head of the chain
# that layer 0's attention waits for): batch 1 1.067 vs 1.073 ms (bench/results/decode_latency_entry_wait-h100.json),
# batch 8 even. An A/B knob.
TOKEN_TO_STATE_GEMV = True


class StateEntries:
    """Per-layer state entries produced in order, on a side stream or in line. `take(i)` hands layer i's
    (k, v) to the current stream, which first waits for the event recorded after it. Tensors the side
    stream reads that the caller allocated (`keep`) are held as long as this object, which the forward
    keeps past its last wait, so their memory is not reused while the side stream may still read it."""

    def __init__(self, side: torch.cuda.Stream | None, keep: tuple = ()):
        self.side, self.keep = side, keep
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.events: list[torch.cuda.Event] = []
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(side.device))

    def on_side(self):
        if self.side is None:
            return contextlib.nullcontext()
        scope = contextlib.ExitStack()
        scope.enter_context(torch.cuda.stream(self.side))
        if SIDE_PLAIN:
            from hybridserve.kernels import pdl     # GPU only: the model module does not import triton
            scope.enter_context(pdl.without())
        return scope

    def add(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.kv.append((k, v))
        if self.side is not None:
            ev = torch.cuda.Event()
            ev.record(self.side)
            self.events.append(ev)

    def take(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.side is not None:
            torch.cuda.current_stream(self.side.device).wait_event(self.events[i])
        return self.kv[i]


@dataclass
class NanoHammerConfig(LlamaConfig):
    state_intermediate_size: int = field(kw_only=True)   # cell MLP width: only the checkpoint shapes say
    state_hidden_size: int = 512
    state_num_heads: int = 16                            # α width; each head scales its own slice
    holo_base: float = HOLO_BASE
    state_norm: str = "rmsnorm"                          # the only kind implemented (see module docstring)

    def cache_layout(self) -> CacheLayout:
        """Backbone paged KV plus I; the position counter is the request's own position, so nothing else."""
        return CacheLayout(kv=super().cache_layout().kv,
                           states={"integral": StateSpec(1, (self.state_hidden_size,), torch.float32)})

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

        if config.qk_norm or config.attn_res:
            raise ValueError("NanoHammer's backbone is plain Llama: qk_norm and attn_res are not supported")
        self.token_to_state = (w("token_to_state.weight"), w("token_to_state.bias"))
        names = {"pre_norm": "state_cell.pre_norm.weight", "fc1": "state_cell.mlp.fc1.weight",
                 "fc1_bias": "state_cell.mlp.fc1.bias", "fc2": "state_cell.mlp.fc2.weight",
                 "fc2_bias": "state_cell.mlp.fc2.bias", "alpha": "state_cell.alpha",
                 "post_norm": "state_cell.post_norm.weight", "proj": "state_projection.weight",
                 "proj_bias": "state_projection.bias"}
        # Each state weight is stored once, stacked over layers, so the engine path can run all state
        # projections as one batched matmul and the cells from one set of pointers; the per-layer dicts
        # the reference path reads are views into the stacks.
        self.state_stack = {}
        for key, name in names.items():
            per_layer = [w(f"layers.{i}.{name}") for i in range(config.num_layers)]
            if all(t is None for t in per_layer):
                self.state_stack[key] = None
            else:
                like = next(t for t in per_layer if t is not None)
                self.state_stack[key] = torch.stack([torch.zeros_like(like) if t is None else t for t in per_layer])
        self.state_layers = [{key: None if t is None else t[i] for key, t in self.state_stack.items()}
                             for i in range(config.num_layers)]
        self.holo_theta = holo_theta(config.state_hidden_size, config.holo_base, self.device)
        self._side: torch.cuda.Stream | None = None      # the state entries' stream (GPU)
        # (F [L, 2·Hkv·D + S, S], vec [L, 2·Hkv·D + S + 1] fp32): the folded state entries, engine path only
        self.entry_fold = self._fold_entries() if FOLD_ENTRY else None
        # [V, S]: token_to_state of each embedding without its bias (TOKEN_STATE_TABLE), engine path only
        self.token_state = (token_state_table(self.embed, self.token_to_state[0])
                            if TOKEN_STATE_TABLE and self.token_to_state[0] is not None else None)

    def _fold_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        kv_rows = self.config.num_heads * self.config.head_dim
        folds = [fold_entry_weights(sl["proj"], sl["proj_bias"], lw["attn_norm"], lw["qkv"][kv_rows:], self.dtype)
                 for sl, lw in zip(self.state_layers, self.layers)]
        return torch.stack([f for f, _ in folds]), torch.stack([v for _, v in folds])

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

    def _attention_entries(self, meta: BatchMeta, h: torch.Tensor | None, cache: CacheView, cos: torch.Tensor,
                           sin: torch.Tensor) -> StateEntries:
        """The engine forward is Llama's (`LlamaModel.forward`: one-row q/k/v matmul, RoPE + KV write,
        paged attention) with every query's state entry as one extra key: a decode step's attention kernel
        starts its softmax from it, prefill merges it through the log-sum-exp. This builds the entries: key
        (RoPE at its query's position) and value [T, Hkv, D] of every layer from the carried I.

        They depend only on the tokens' embeddings and positions, so on a GPU the whole chain (integral
        readout, the 16 cells at two fused kernels each, then per layer the state projection, the input
        norm, the entry's k/v projection and its RoPE) is queued on a side stream beside the backbone, and
        layer i waits only for its own entry, just before its attention (in line elsewhere, or with
        SIDE_STREAM off). With the fold (FOLD_ENTRY, built at load) a layer's projection, norm, k/v
        projection and RoPE are one GEMV against its folded weight and one epilogue kernel, reading a quarter
        of the bytes (at full size) on that side stream, where they take bandwidth from the backbone.

        With the token table (TOKEN_STATE_TABLE) token_to_state is a row gather, so the chain reads token ids,
        not h (None then): the forward queues it before the embedding gather (ENTRIES_BEFORE_GATHER). A decode
        step's chain (DECODE_CHAIN, kernels/state_token*.py `decode_state_chain`) at batch 1 runs the readout
        inside the first cell kernels and each layer's folded GEMV inside the cell kernel that finishes its
        state: layer 0's entry is 4 kernels from the step's start. It yields no GEMV output where its kernels
        leave the fold to this method (several rows)."""
        c, eps = self.config, self.config.rms_norm_eps
        pool = cache.states["integral"][0]
        ops, fused = pick("state_token", self.device), pick("fused", self.device)
        T, Hkv, D = meta.input_ids.shape[0], c.num_kv_heads, c.head_dim
        table = self._table()
        entries = StateEntries(self._side_stream() if SIDE_STREAM and pool.is_cuda else None, keep=(h, cos, sin))
        st = self.state_stack
        cells = (st["pre_norm"], st["fc1"], st["fc1_bias"], st["fc2"], st["fc2_bias"], st["alpha"], st["post_norm"])
        fold, vec = self.entry_fold if FOLD_ENTRY and self.entry_fold is not None else (None, None)
        with entries.on_side():
            weight, bias = self.token_to_state
            if meta.is_decode:
                if table is not None:
                    x, rows = table, meta.input_ids
                elif TOKEN_TO_STATE_GEMV:
                    x, rows = fused.linear(h, weight, side=True), None
                else:
                    x, rows, bias = F.linear(h, weight, bias), None, None
                if DECODE_CHAIN:
                    chain = ops.decode_state_chain(x, rows, bias, meta.positions, self.holo_theta, pool, meta.slot_ids,
                                                   cells, eps, fold)
                else:
                    s0 = ops.decode_readout(x if rows is None else fused.gather_rows(x, rows), meta.positions,
                                            self.holo_theta, pool, meta.slot_ids, bias=bias)
                    chain = ((s, None) for s in ops.state_cell_steps(s0, *cells, eps))
            else:
                if table is not None:     # the bias in fp32, as the decode readout adds it
                    w = table[meta.input_ids].float() + (0 if bias is None else bias.float())
                else:
                    w = F.linear(h, weight, bias).float()
                u = holo_rope(w, meta.positions, c.holo_base)
                s0 = holo_rope_inv(varlen_integral(u, meta.cu_seqlens, pool, meta.slot_ids), meta.positions,
                                   c.holo_base)
                chain = ((s, None) for s in ops.state_cell_steps(s0, *cells, eps))
            for i, (s, entry) in enumerate(chain):
                if fold is not None:
                    if entry is None:
                        entry = fused.linear(s, fold[i], side=True)
                    entries.add(*ops.folded_entry(entry, s, vec[i], cos, sin, Hkv, D, eps))
                    continue
                r = fused.linear(s, st["proj"][i], side=True)
                xs = ops.state_inputs(r, None if st["proj_bias"] is None else st["proj_bias"][i],
                                      self.layers[i]["attn_norm"], eps)
                kv = fused.linear(xs, self.layers[i]["qkv"][c.num_heads * D:], side=True).view(T, 2, Hkv, D)
                entries.add(fused.rope(kv[:, 0], cos, sin), kv[:, 1])
        return entries

    def _table(self) -> torch.Tensor | None:
        return self.token_state if TOKEN_STATE_TABLE else None

    def _entries_need_embedding(self) -> bool:
        return self._table() is None or not ENTRIES_BEFORE_GATHER

    def _side_stream(self) -> torch.cuda.Stream:
        if self._side is None:
            self._side = torch.cuda.Stream(device=self.device)
        return self._side

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
