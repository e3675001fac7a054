"""A whole Spartacus decode step of one sequence (batch 1) as one function: the reference of the
persistent step kernel in `kernels/spartacus_step_triton.py`.

The same math, with the same rounding points, as SpartacusModel.forward on a one-token decode batch:
per layer  h += δ; qkvz = RMSNorm(h)·Wqkvz; o = monoid step of every head on the slot's state;
δ = o·Wo; h += δ; g = SiLU(gate)·up of RMSNorm(h)·W[gate; up]; δ = g·Wdown; then the logits of
RMSNorm(h + δ) in fp32. Weights come stacked over layers (`StepWeights`), the layout the kernel reads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridserve.kernels import fused, monoid


@dataclass
class StepWeights:
    """A Spartacus model's weights stacked over its layers ([L, ...] each), plus the shapes the step needs."""

    embed: torch.Tensor          # [V, E]
    attn_norm: torch.Tensor      # [L, E]
    qkvz: torch.Tensor           # [L, 3·A + gate width, E]  (A = heads · head_dim)
    q_norm: torch.Tensor         # [L, head_dim or A] fp32, the q scale d^-1/2 folded in
    k_norm: torch.Tensor         # [L, head_dim or A]
    decay_bias: torch.Tensor | None   # [L, gate width] fp32
    o: torch.Tensor              # [L, E, A]
    ffn_norm: torch.Tensor       # [L, E]
    gate_up: torch.Tensor        # [L, 2·I, E]
    down: torch.Tensor           # [L, E, I]
    norm: torch.Tensor           # [E]
    lm_head: torch.Tensor        # [V, E]
    num_heads: int
    head_dim: int
    eps: float
    decay_gate: str

    @property
    def num_layers(self) -> int:
        return self.qkvz.shape[0]


def decode_step(sw: StepWeights, input_ids: torch.Tensor, slot_ids: torch.Tensor,
                states: torch.Tensor, fused_ops=fused, monoid_ops=monoid) -> torch.Tensor:
    """Logits [1, V] fp32 of one sequence's next token; its state slot (states [L, slots, H, d, d])
    advanced in place. `fused_ops` / `monoid_ops`: the per-layer kernels it is composed of (the plain
    references; their Triton twins give the per-layer path the persistent kernel replaces)."""
    assert input_ids.numel() == 1 and slot_ids.numel() == 1, "the step function serves one sequence"
    h, delta = sw.embed[input_ids.view(1)], None
    for i in range(sw.num_layers):
        h, qkvz = fused_ops.add_norm_linear(h, delta, sw.attn_norm[i], sw.qkvz[i], sw.eps)
        bias = None if sw.decay_bias is None else sw.decay_bias[i]
        o = monoid_ops.fused_decode(qkvz, sw.q_norm[i], sw.k_norm[i], bias, sw.num_heads, sw.head_dim, sw.eps,
                                    sw.decay_gate, states[i], slot_ids.view(1))
        h, g = fused_ops.add_norm_linear_silu_mul(h, fused_ops.linear(o.reshape(1, -1), sw.o[i]), sw.ffn_norm[i],
                                                  sw.gate_up[i], sw.eps)
        delta = fused_ops.linear(g, sw.down[i])
    return fused_ops.add_norm_linear(h, delta, sw.norm, sw.lm_head, sw.eps, out_dtype=torch.float32)[1]
