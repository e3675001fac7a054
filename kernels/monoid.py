"""Gated linear attention with a per-key-dimension decay (the Spartacus monoid), plain PyTorch reference.

Per head, with S a [dk, dv] state (row = key dim, column = value dim):

    S_t = diag(exp(log_a_t)) · S_{t-1} + k_t v_tᵀ        o_t = q_tᵀ S_t      (inclusive readout)

q arrives already scaled by dk^-1/2. State and cumulative log-decay are fp32; outputs come back in the
input dtype. The Triton kernels in monoid_triton.py keep these exact signatures.
"""
from __future__ import annotations

import torch

from hybridserve.kernels.fused import add_norm_linear, monoid_prep


def _initial(initial_state: torch.Tensor | None, H: int, dk: int, dv: int, device) -> torch.Tensor:
    if initial_state is None:
        return torch.zeros(H, dk, dv, dtype=torch.float32, device=device)
    return initial_state.to(torch.float32).clone()


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_a: torch.Tensor,
          initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token loop straight from the update equation: q/k/log_a [T, H, dk], v [T, H, dv].

    Returns (o [T, H, dv], final state [H, dk, dv] fp32); initial_state is not modified.
    """
    T, H, dk = q.shape
    dv = v.shape[-1]
    S = _initial(initial_state, H, dk, dv, q.device)
    qf, kf, vf, a = q.float(), k.float(), v.float(), log_a.float().exp()
    o = torch.empty(T, H, dv, dtype=torch.float32, device=q.device)
    for t in range(T):
        S = a[t][:, :, None] * S + kf[t][:, :, None] * vf[t][:, None, :]
        o[t] = (qf[t][:, :, None] * S).sum(1)
    return o.to(v.dtype), S


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_a: torch.Tensor,
            initial_state: torch.Tensor | None = None, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked parallel form of `naive` for one sequence; same inputs and outputs.

    Within a chunk, b = inclusive cumsum of log_a. Token i then reads the carried state through exp(b_i)
    and token j ≤ i through exp(b_i - b_j). Every exponent is ≤ 0 (pairs j > i are masked to -inf
    before exp), so nothing overflows however strong the decay; the price is a [H, C, C, dk] decay
    tensor per chunk, which is fine for a reference.
    """
    T, H, dk = q.shape
    dv = v.shape[-1]
    S = _initial(initial_state, H, dk, dv, q.device)
    qf, kf, vf, g = (x.float().transpose(0, 1) for x in (q, k, v, log_a))   # [H, T, ...]
    o = torch.empty(H, T, dv, dtype=torch.float32, device=q.device)
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        C = end - start
        qc, kc, vc = qf[:, start:end], kf[:, start:end], vf[:, start:end]
        b = g[:, start:end].cumsum(1)                                        # [H, C, dk]
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        rel = torch.where(causal[:, :, None], b[:, :, None, :] - b[:, None, :, :], float("-inf"))
        scores = (qc[:, :, None, :] * kc[:, None, :, :] * rel.exp()).sum(-1)   # [H, C, C]
        o[:, start:end] = (qc * b.exp()) @ S + scores @ vc
        b_last = b[:, -1:, :]                                                # [H, 1, dk]
        S = b_last.transpose(1, 2).exp() * S + (kc * (b_last - b).exp()).transpose(1, 2) @ vc
    return o.transpose(0, 1).to(v.dtype), S


def varlen_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_a: torch.Tensor,
                   cu_seqlens: torch.Tensor, state_pool: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """A packed batch of sequences (offsets cu_seqlens [B+1]); sequence b continues from
    state_pool[slot_ids[b]] and leaves its final state there, in place. state_pool: [slots, H, dk, dv]."""
    o = torch.empty_like(v)
    bounds = cu_seqlens.tolist()
    for b, slot in enumerate(slot_ids.tolist()):
        s, e = bounds[b], bounds[b + 1]
        if s == e:
            continue
        o[s:e], final = chunked(q[s:e], k[s:e], v[s:e], log_a[s:e], state_pool[slot])
        state_pool[slot] = final
    return o


def decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_a: torch.Tensor,
                state_pool: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """One token per sequence (q/k/log_a [B, H, dk], v [B, H, dv]); updates each slot in place.

    Padding rows carry slot 0, so they only ever read and write the reserved pad slot.
    """
    S = state_pool[slot_ids]                                                 # [B, H, dk, dv] fp32
    S = log_a.float().exp()[..., None] * S + k.float()[..., None] * v.float()[..., None, :]
    state_pool.index_copy_(0, slot_ids, S)
    return (q.float()[..., None] * S).sum(-2).to(v.dtype)


def fused_decode(qkvz: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor, decay_bias: torch.Tensor | None,
                 num_heads: int, head_dim: int, eps: float, decay_gate: str, state_pool: torch.Tensor,
                 slot_ids: torch.Tensor, prefetch: torch.Tensor | None = None) -> torch.Tensor:
    """A Spartacus decode step's attention core from its [q | k | v | z] projection rows [B, 3·W + G]:
    the glue of kernels/fused.py `monoid_prep`, then `decode_step` on the slots. Returns o [B, H, d].
    `prefetch`: a weight the Triton file asks into L2 meanwhile (kernels/l2_prefetch.py); a hint, unused here."""
    q, k, v, log_a = monoid_prep(qkvz, q_norm, k_norm, decay_bias, num_heads, head_dim, eps, decay_gate)
    return decode_step(q, k, v, log_a, state_pool, slot_ids)


def projection_decode(h: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, qkvz_weight: torch.Tensor,
                      q_norm: torch.Tensor, k_norm: torch.Tensor, decay_bias: torch.Tensor | None, num_heads: int,
                      head_dim: int, eps: float, decay_gate: str, state_pool: torch.Tensor,
                      slot_ids: torch.Tensor,
                      prefetch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's attention core from the residual stream: h += delta, the RMSNorm and q|k|v|z
    projection (kernels/fused.py `add_norm_linear`), then `fused_decode`. Returns (h, o [B, H, d]).
    `prefetch`: as in `fused_decode`."""
    h, qkvz = add_norm_linear(h, delta, norm_weight, qkvz_weight, eps)
    return h, fused_decode(qkvz, q_norm, k_norm, decay_bias, num_heads, head_dim, eps, decay_gate, state_pool,
                           slot_ids)
