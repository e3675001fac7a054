"""Small building blocks shared by the model files. Plain PyTorch; shapes are [tokens, ...]."""
from __future__ import annotations

import math
import os
from typing import Callable, Union

import torch
import torch.nn.functional as F

from hybridserve.kernels.backend import pick


def unique_bytes(tensors) -> int:
    """Bytes held by the distinct tensors among `tensors` (tied weights counted once; None skipped)."""
    unique = {id(t): t for t in tensors if t is not None}
    return sum(t.numel() * t.element_size() for t in unique.values())


def padded_rows(weight: torch.Tensor, multiple: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(view, buffer): `weight` [N, K] copied into the first N rows of a zero [N', K] buffer, N' the next
    multiple of `multiple`, and its [N, K] view (contiguous, the same values); (weight, None) when N is a
    multiple already. A multi-row product against the buffer, sliced to N columns, has an aligned output row:
    cuBLAS runs unaligned kernels for a row of N elements with N not a multiple of 8 (a 151,665-word head,
    NeoLLM's, took 217 µs for 64 rows on an H100; bench/results/prof_prefill-h100.json)."""
    n = weight.shape[0]
    if n % multiple == 0:
        return weight, None
    buf = weight.new_zeros(-(-n // multiple) * multiple, *weight.shape[1:])
    buf[:n].copy_(weight)
    return buf[:n], buf


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, cast back to the input dtype (one fused kernel on GPU)."""
    return pick("fused", x.device).rms_norm(x, weight, eps)


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with gate and up fused into one [2I, D] matrix."""
    return F.linear(pick("fused", x.device).silu_mul(F.linear(x, gate_up)), down)


def rope_params(c: dict, default_theta: float = 10000.0) -> tuple[float, dict | None, float | None]:
    """(theta, scaling, partial_rotary_factor) from a config.json in either layout: top-level
    rope_theta / rope_scaling / partial_rotary_factor, or the newer nested `rope_parameters`."""
    nested = c.get("rope_parameters") or {}
    theta = float(c.get("rope_theta", nested.get("rope_theta", default_theta)))
    scaling = c.get("rope_scaling")
    if scaling is None and nested.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in nested.items() if k not in ("rope_theta", "partial_rotary_factor")}
    partial = c.get("partial_rotary_factor", nested.get("partial_rotary_factor"))
    return theta, scaling, partial


def rope_inv_freq(rot_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies for rotate-half RoPE over `rot_dim` dims, with optional llama3 scaling."""
    inv = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        factor = scaling["factor"]
        lo, hi = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        lo_wl, hi_wl = old_len / lo, old_len / hi
        smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > lo_wl, inv / factor, inv)
        mid = (wavelen <= lo_wl) & (wavelen >= hi_wl)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables [T, rot_dim] for the given absolute positions (angles computed in fp64)."""
    ang = positions.to(torch.float64)[:, None] * inv_freq.to(positions.device)[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


class RopeTable:
    """cos/sin rows of every position in [0, length) (the model's context: the engine admits no longer),
    computed once at load with `rope_cos_sin` into one [2, length, R] stack, so an engine step gathers its
    rows of both (one kernel, kernels/fused*.py `gather_rows`) instead of recomputing them (~7). Positions
    past the table are computed as before."""

    def __init__(self, inv_freq: torch.Tensor, length: int, dtype: torch.dtype, device: torch.device):
        self.inv_freq, self.dtype, self.length = inv_freq, dtype, length
        self.table = torch.stack(rope_cos_sin(torch.arange(length, device=device), inv_freq, dtype))

    def __call__(self, positions: torch.Tensor, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows for `positions`; `longest` (a host int, the batch's longest context) picks table or compute."""
        if longest <= self.length:
            cos, sin = pick("fused", positions.device).gather_rows(self.table, positions)
            return cos, sin
        return rope_cos_sin(positions, self.inv_freq, self.dtype)


def logit_rows(meta, *xs: torch.Tensor | None) -> tuple:
    """The rows of packed [T, ·] tensors that need logits; a decode step needs every row in order, so
    nothing is gathered (None passes through)."""
    if meta.is_decode and meta.logits_indices.shape[0] == meta.num_tokens:
        return xs
    return tuple(None if x is None else x[meta.logits_indices] for x in xs)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first cos.shape[-1] dims of x [T, H, D]; the rest pass through."""
    return pick("fused", x.device).rope(x, cos, sin)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain causal attention over one whole sequence: q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale
    )
    return o.transpose(0, 1)


# A query's extra key/value [T, Hkv, D] each, or a zero-argument callable giving them (`take_entry`)
Entry = Union[tuple[torch.Tensor, torch.Tensor], Callable[[], tuple[torch.Tensor, torch.Tensor]]]


def take_entry(entry: Entry | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A query's extra key/value (NanoHammer's state entry) as the attention kernel reads it. The model may hand
    it over as a zero-argument callable, taken here just before the attention: on a GPU that is where the
    current stream starts waiting for the side stream that builds it, so the q|k|v GEMV and RoPE before it do
    not wait too."""
    return entry() if callable(entry) else entry


def cached_attention(q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], meta, scale: float,
                     return_lse: bool = False, entry: Entry | None = None):
    """Causal attention of q [T, H, D] over each sequence's pages, whose k/v for this step are already
    written (kernels/fused*.py `rope_write_kv`), plus each query's own extra key/value when `entry` =
    (k_e, v_e) [T, Hkv, D] is given (NanoHammer's state entry): the decode kernel when every row has one
    token (graph-capturable), the varlen prefill kernel otherwise."""
    attn = pick("paged_attention", q.device)
    k_cache, v_cache = kv
    entry = take_entry(entry)
    if meta.is_decode:
        return attn.decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, return_lse=return_lse,
                           entry=entry)
    return attn.varlen_prefill(q, k_cache, v_cache, meta.cu_seqlens, meta.seq_lens, meta.block_tables, scale,
                               max(meta.query_lens_cpu), return_lse=return_lse, entry=entry)


# A decode step's QK-norm, RoPE, KV-page write and attention as one kernel (paged_attention_triton.decode_step)
# instead of rope_write_kv, then the attention kernel. Off: within run-to-run spread or slower. Batch-1 graph
# ms on an H100, two rounds (bench/results/attention_fusion-h100.json), separate → RoPE inside → RoPE and the
# split merge (paged_attention_triton.FUSED_MERGE) inside: NanoHammer 1.256 / 1.226 → 1.272 / 1.195 → 1.235 /
# 1.200, Kotodama-3B 2.806 / 2.727 → 2.827 / 2.842 → 2.969 / 2.883, Kotodama-108M 0.734 / 0.759 → 0.737 /
# 0.707 → 0.755 / 0.761, NeoLLM 0.383 / 0.359 → 0.384 / 0.374 → 0.389 / 0.358. The program holding the last
# key wrote and re-read the step's k/v before its loop then; it now takes them from registers (no round trip),
# and it is still slower: separate vs one kernel, three rounds in turn (bench/results/decode_latency_attn_seed-
# h100.json) Llama-3.2-3B shapes 2.644 vs 2.677 ms, NanoHammer 1.110 vs 1.115, Kotodama-3B 2.610 vs 2.692; with the
# splits merged by the last of them too 2.856 / 1.138 / 2.772.
ATTN_STEP_FUSED = False


# A batch-1 decode step's attention sublayer after its q|k|v GEMV as one kernel through the o projection
# (kernels/attention_o*.py: RoPE + KV write, attention and o projection; 4 kernels a layer instead of 7), for
# models whose residual add takes its fp32 output (plain Llama and NanoHammer). Off: slower. Each of its
# programs attends over its kv head's whole context itself (no partials to share), and that costs more than the
# three kernel boundaries it removes. H100, batch 1, context 128, three rounds in turn (bench/results/
# decode_latency_attn_o-h100.json): Llama-3.2-3B shapes 2.648 ms unfused vs 2.832 (2 programs an SM, 16-row
# weight tiles), 2.738 (32-row tiles), 2.973 / 3.102 (1 / 4 programs an SM); NanoHammer 1.118 vs 1.136–1.247.
# An A/B knob (HYBRIDSERVE_ATTN_O=1; decode_latency.py's attn_o variants). It is correct at any context, but
# its KV reads grow with the row runs, and a decode graph's capture (one key a row) takes it whatever the
# context the replays see.
ATTN_O = os.environ.get("HYBRIDSERVE_ATTN_O", "0") == "1"
# The same sublayer with the attention as the unfused path runs it up to its split kernel (q|k|v GEMV, RoPE + KV
# write, split programs), then one kernel in place of the split merge and the o GEMV: each program (sequence,
# kv head, run of o rows) merges its kv head's partials itself and adds its rows' products over that head group's
# columns into the fp32 output (kernels/attention_o*.py `decode_merged`). Off: slower or even. H100, batch 1,
# context 128, three rounds in turn, default vs one kernel with 1 / 2 / 3 / 4 / 6 / 8 programs per SM of 16-row
# tiles (bench/results/decode_latency_merge_o*-h100.json, two runs): Llama-3.2-3B shapes 2.627 vs 2.776 / 2.714 /
# 2.726 / 2.739 / 2.829 / 2.897 ms (2 per SM, 32-row tiles: 2.694), NanoHammer 1.099 vs 1.128 / 1.098 / 1.106 /
# 1.109 / 1.163 / 1.160. Every program re-reads its head group's partials from L2 after its wait, and the
# atomics land on each output row once per kv head. An A/B knob (HYBRIDSERVE_ATTN_MERGE_O=1; decode_latency.py
# merge_o variants).
ATTN_MERGE_O = os.environ.get("HYBRIDSERVE_ATTN_MERGE_O", "0") == "1"


def attention_o_applies(meta) -> bool:
    """Whether this step's attention sublayers go through kernels/attention_o (`norm_attention_o`)."""
    return (ATTN_O or ATTN_MERGE_O) and meta.is_decode and meta.num_tokens == 1


def norm_attention_o(h: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor,
                     qkv_weight: torch.Tensor, o_weight: torch.Tensor, out: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, num_heads: int, kv: tuple[torch.Tensor, torch.Tensor], meta, scale: float,
                     q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-5,
                     entry: Entry | None = None):
    """`norm_attention` and the o projection for a decode step where `attention_o_applies`: (h', the o
    projection, added into `out`, fp32 zeros)."""
    if ATTN_MERGE_O and not ATTN_O:
        h, q = pick("fused", h.device).add_norm_linear_rope_kv(h, delta, norm_weight, qkv_weight, eps, cos, sin,
                                                               num_heads, kv[0], kv[1], meta.slot_mapping, q_norm,
                                                               k_norm)
        return h, pick("attention_o", h.device).decode_merged(q, kv[0], kv[1], meta.block_tables, meta.seq_lens,
                                                              scale, o_weight, out, take_entry(entry))
    h, qkv = pick("fused", h.device).add_norm_linear(h, delta, norm_weight, qkv_weight, eps)
    D = kv[0].shape[-1]
    return h, pick("attention_o", h.device).decode(
        qkv.view(h.shape[0], -1, D), cos, sin, num_heads, kv[0], kv[1], meta.slot_mapping, meta.block_tables,
        meta.seq_lens, scale, o_weight, out, q_norm, k_norm, eps, take_entry(entry))


def norm_attention(h: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, qkv_weight: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, num_heads: int, kv: tuple[torch.Tensor, torch.Tensor], meta,
                   scale: float, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                   eps: float = 1e-5, entry: Entry | None = None,
                   prefetch: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None):
    """The attention sublayer from the residual stream, up to the o projection: h' = h + delta (h when delta is
    None), its RMSNorm and q|k|v projection, then `attention_step`. Returns (h', o [T, H, D]). A decode step
    goes through fused `add_norm_linear_rope_kv`, which takes RoPE and the KV write into the projection's
    epilogue where its opt-in ROPE_IN_GEMV knob and the shapes allow (else the same two steps). `prefetch`:
    the o projection's weight (and the weight after it), which the RoPE kernel asks into L2 where the opt-in
    kernels/l2_prefetch.py PREFETCH is on."""
    fused = pick("fused", h.device)
    if meta.is_decode and not ATTN_STEP_FUSED:
        h, q = fused.add_norm_linear_rope_kv(h, delta, norm_weight, qkv_weight, eps, cos, sin, num_heads, kv[0],
                                             kv[1], meta.slot_mapping, q_norm, k_norm, prefetch)
        return h, cached_attention(q, kv, meta, scale, entry=entry)
    h, qkv = fused.add_norm_linear(h, delta, norm_weight, qkv_weight, eps)
    D = kv[0].shape[-1]
    return h, attention_step(qkv.view(h.shape[0], -1, D), cos, sin, num_heads, kv, meta, scale, q_norm, k_norm, eps,
                             entry)


def attention_step(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                   kv: tuple[torch.Tensor, torch.Tensor], meta, scale: float, q_norm: torch.Tensor | None = None,
                   k_norm: torch.Tensor | None = None, eps: float = 1e-5,
                   entry: Entry | None = None) -> torch.Tensor:
    """The attention sublayer between its projections on the engine path: the raw q|k|v heads
    qkv [T, H + 2·Hkv, D] → o [T, H, D]. QK-norm (q_norm / k_norm) and RoPE, the step's k/v written to
    their pages, then causal attention over each sequence's pages, plus one extra key/value per query when
    `entry` = (k_e, v_e) [T, Hkv, D] (NanoHammer's state entry). With ATTN_STEP_FUSED a decode step is one
    kernel; otherwise rope_write_kv, then `cached_attention`."""
    k_cache, v_cache = kv
    if meta.is_decode and ATTN_STEP_FUSED:
        return pick("paged_attention", qkv.device).decode_step(
            qkv, cos, sin, num_heads, k_cache, v_cache, meta.slot_mapping, meta.block_tables, meta.seq_lens, scale,
            q_norm, k_norm, eps, take_entry(entry))
    q = pick("fused", qkv.device).rope_write_kv(qkv, cos, sin, num_heads, k_cache, v_cache, meta.slot_mapping,
                                                 q_norm, k_norm, eps)[:, :num_heads]
    return cached_attention(q, kv, meta, scale, entry=entry)
