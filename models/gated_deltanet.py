"""One Gated DeltaNet layer (Qwen3-Next semantics, specs/gated_deltanet.md §6) as a pure function.

The layer sees one canonical projection, rows [all q | all k | all v | z | b | a], so the first conv_dim
outputs feed the short conv directly. Checkpoints in the Qwen3-Next grouped layout (`in_proj_qkvz`,
`in_proj_ba`, rows grouped by key head) or the Qwen3.5 separate layout (`in_proj_qkv/z/b/a`) are
reordered into it once at load time (§5).

Per-request memory: the recurrent state [Hv, dk, dv] (fp32) and the conv window [conv_dim, K−1] (model
dtype), both held in state slots and continued by every multi-token forward (chunked prefill).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hybridserve.kernels import gated_delta, short_conv
from hybridserve.kernels.backend import pick
from hybridserve.models.batch import BatchMeta


@dataclass(frozen=True)
class GDNDims:
    hidden_size: int
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int
    eps: float

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    @property
    def state_shape(self) -> tuple[int, int, int]:
        return (self.num_v_heads, self.head_k_dim, self.head_v_dim)

    @property
    def window_shape(self) -> tuple[int, int]:
        return (self.conv_dim, self.conv_kernel - 1)


@dataclass
class GDNWeights:
    in_proj: torch.Tensor    # [conv_dim + value_dim + 2·Hv, hidden], rows [q | k | v | z | b | a]
    conv: torch.Tensor       # [conv_dim, K]
    dt_bias: torch.Tensor    # [Hv] fp32
    A_log: torch.Tensor      # [Hv] fp32
    norm: torch.Tensor       # [dv], shared by all heads
    out_proj: torch.Tensor   # [hidden, value_dim]

    def tensors(self) -> list[torch.Tensor]:
        return [self.in_proj, self.conv, self.dt_bias, self.A_log, self.norm, self.out_proj]


# -- load-time layout conversion ------------------------------------------------------------------

def split_grouped(qkvz: torch.Tensor, ba: torch.Tensor, dims: GDNDims):
    """Qwen3-Next grouped rows → the separate layout (qkv [all q | all k | all v], z, b, a).

    Grouped: per key head g, qkvz holds [q_g | k_g | v of heads g·r…g·r+r−1 | z of those heads] and
    ba holds [b of those heads | a of those heads].
    """
    hk, dk, dv = dims.num_k_heads, dims.head_k_dim, dims.head_v_dim
    r = dims.num_v_heads // hk
    hidden = qkvz.shape[-1]
    q, k, v, z = qkvz.view(hk, 2 * dk + 2 * r * dv, hidden).split([dk, dk, r * dv, r * dv], dim=1)
    b, a = ba.view(hk, 2 * r, hidden).split([r, r], dim=1)
    flat = [t.reshape(-1, hidden) for t in (q, k, v, z, b, a)]
    return torch.cat(flat[:3]), flat[3], flat[4], flat[5]


def fuse_separate(qkv: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Qwen3.5 separate projections → the canonical single projection."""
    return torch.cat([qkv, z, b, a])


def load_weights(weights: dict[str, torch.Tensor], prefix: str, dims: GDNDims, dtype: torch.dtype,
                 device: torch.device) -> GDNWeights:
    """Canonical GDN weights from the tensors under `prefix` (grouped or separate layout)."""
    def w(name: str) -> torch.Tensor:
        return weights[prefix + name]

    if prefix + "in_proj_qkvz.weight" in weights:
        in_proj = fuse_separate(*split_grouped(w("in_proj_qkvz.weight"), w("in_proj_ba.weight"), dims))
    else:
        in_proj = fuse_separate(*(w(f"in_proj_{x}.weight") for x in ("qkv", "z", "b", "a")))
    return GDNWeights(
        in_proj=in_proj.to(device=device, dtype=dtype),
        conv=w("conv1d.weight").reshape(dims.conv_dim, dims.conv_kernel).to(device=device, dtype=dtype),
        dt_bias=w("dt_bias").to(device=device, dtype=torch.float32),
        A_log=w("A_log").to(device=device, dtype=torch.float32),
        norm=w("norm.weight").to(device=device, dtype=dtype),
        out_proj=w("out_proj.weight").to(device=device, dtype=dtype),
    )


# -- the layer ------------------------------------------------------------------------------------

def reference(x: torch.Tensor, w: GDNWeights, dims: GDNDims) -> torch.Tensor:
    """One whole sequence from zero state and an empty window, with the token-by-token recurrence."""
    y = gated_delta.mix(F.linear(x, w.in_proj), w.conv, w.A_log, w.dt_bias, w.norm, dims.eps, dims.head_k_dim,
                        lambda u, wc: short_conv.reference(u, wc)[0],
                        lambda *qkvgb: gated_delta.naive(*qkvgb)[0])
    return F.linear(y, w.out_proj)


def mix(proj: torch.Tensor, w: GDNWeights, dims: GDNDims, meta: BatchMeta, conv_pool: torch.Tensor,
        state_pool: torch.Tensor) -> torch.Tensor:
    """Engine path between the projections, on proj = in_proj(x) of a packed batch: each sequence continues
    from its slot in conv_pool [slots+1, conv_dim, K−1] and state_pool [slots+1, Hv, dk, dv] (this layer's
    slices), in place. Returns y [T, value_dim] for out_proj. Decode is one fused kernel on GPU with
    device-side slot indexing only, so it can be captured in a CUDA graph."""
    slots = meta.slot_ids
    rule = pick("gated_delta", proj.device)
    if meta.is_decode:
        return rule.fused_decode(proj, w.conv, w.A_log, w.dt_bias, w.norm, dims.eps, conv_pool, state_pool, slots)
    conv = pick("short_conv", proj.device)
    return gated_delta.mix(proj, w.conv, w.A_log, w.dt_bias, w.norm, dims.eps, dims.head_k_dim,
                           lambda u, wc: conv.varlen_prefill(u, wc, meta.cu_seqlens, conv_pool, slots),
                           lambda *qkvgb: rule.varlen_prefill(*qkvgb, meta.cu_seqlens, state_pool, slots))


def forward(x: torch.Tensor, w: GDNWeights, dims: GDNDims, meta: BatchMeta, conv_pool: torch.Tensor,
            state_pool: torch.Tensor) -> torch.Tensor:
    """The whole layer on the engine path: in_proj, `mix`, out_proj (GEMVs for a few rows on GPU)."""
    fused = pick("fused", x.device)
    return fused.linear(mix(fused.linear(x, w.in_proj), w, dims, meta, conv_pool, state_pool), w.out_proj)
