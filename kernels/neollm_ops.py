"""NeoLLM's per-layer glue in plain PyTorch (specs/neollm.md §5): the FAN input transform, PolyNorm, and
the GPAS-scaled residual add with the next RMSNorm and projection. These are the definitions the model's
reference forward uses, and the reference for kernels/neollm_ops_triton.py, which runs each chain as one
kernel (a GEMV with the glue inside it) for the few rows of a decode step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridserve.kernels.fused import rms_norm

POLYNORM_EPS = 1e-6  # Motif's PolyNorm (neollm.md §5.5)


def fan_act(pg: torch.Tensor, p: int) -> torch.Tensor:
    """FAN's output from its linear's [P | G]: cat(cos P, sin P, G), cos/sin in fp32 (no activation on G)."""
    P = pg[..., :p].float()
    return torch.cat([P.cos().to(pg.dtype), P.sin().to(pg.dtype), pg[..., p:]], dim=-1)


def fan(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: int) -> torch.Tensor:
    """FANformer input transform: [P | G] = W h + b → cat(cos P, sin P, G)."""
    return fan_act(F.linear(h, weight, bias), p)


def poly_norm(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """PolyNorm: w0·N(u³) + w1·N(u²) + w2·N(u) + b, N(v) = v·rsqrt(mean(v²) + eps), all in fp32."""
    uf = u.float()

    def n(v):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + POLYNORM_EPS)

    w = weight.float()
    return (w[0] * n(uf ** 3) + w[1] * n(uf ** 2) + w[2] * n(uf) + bias.float()).to(u.dtype)


def add_scale_norm_linear(h: torch.Tensor, delta: torch.Tensor | None, scale: float, norm_weight: torch.Tensor,
                          weight: torch.Tensor, eps: float, bias: torch.Tensor | None = None, fan_p: int = 0,
                          out_dtype: torch.dtype | None = None,
                          padded_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h', y): h' = (h + delta)·scale, the residual stream after a sublayer and its GPAS gate, rounded as
    it is stored (h itself when delta is None); y = weight · RMSNorm(h') + bias, followed by FAN's
    cat(cos P, sin P, G) over its first fan_p outputs when fan_p > 0 (y is then fan_p wider than weight's
    rows); out_dtype: y cast after. `padded_weight`: weight in a row-padded buffer (layers.padded_rows), which
    the fast kernels' multi-row product may use instead; the same y."""
    if delta is not None:
        h = (h + delta) * scale
    y = F.linear(rms_norm(h, norm_weight, eps), weight, bias)
    if fan_p:
        y = fan_act(y, fan_p)
    return h, y if out_dtype is None else y.to(out_dtype)


def poly_mul_linear(gate_up: torch.Tensor, poly_weight: torch.Tensor, poly_bias: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:
    """The MLP after its stacked [gate; up] projection: weight · (PolyNorm(g)·u) for gate_up = [g | u]."""
    g, u = gate_up.chunk(2, dim=-1)
    return F.linear(poly_norm(g, poly_weight, poly_bias) * u, weight)
