"""Attention over a paged KV cache (plain PyTorch reference).

k_cache/v_cache: [num_pages, page_size, Hkv, D]. A sequence's tokens live in the pages listed by its
block table row, in order. New tokens are written first (`write_kv`), then every query attends causally
to all tokens of its sequence up to its own position.
"""
from __future__ import annotations

import torch

from hybridserve.kernels.fused import rope_write_kv
from hybridserve.models.batch import BatchMeta


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter the new tokens' k/v [T, Hkv, D] into their flat page positions."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v.to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence, [length, Hkv, D]."""
    page = cache.shape[1]
    n_pages = (length + page - 1) // page
    return cache[block_table[:n_pages].long()].reshape(-1, *cache.shape[2:])[:length]


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: BatchMeta,
              scale: float, return_lse: bool = False):
    """Varlen causal attention of packed queries q [T, H, D] over each sequence's pages (the metadata
    form of `varlen_prefill`)."""
    return _varlen(q, k_cache, v_cache, meta.query_lens_cpu, meta.seq_lens_cpu, meta.block_tables, scale,
                   return_lse)


def varlen_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens: torch.Tensor,
                   seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, max_query_len: int,
                   return_lse: bool = False, entry: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Sequence b's queries q[cu_seqlens[b]:cu_seqlens[b+1]] attend causally to its first seq_lens[b]
    cached tokens, and each to its own extra key/value when `entry` = (k_e, v_e) [T, Hkv, D] is given
    (`merge_entry`). Returns out [T, H, D] (and the fp32 log-sum-exp [T, H] when return_lse, no entry)."""
    cu = cu_seqlens.tolist()
    qlens = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if entry is None:
        return _varlen(q, k_cache, v_cache, qlens, seq_lens.tolist(), block_tables, scale, return_lse)
    assert not return_lse, "the log-sum-exp of attention with an entry is not provided here"
    return merge_entry(*_varlen(q, k_cache, v_cache, qlens, seq_lens.tolist(), block_tables, scale, True), q,
                       *entry, scale)


def _varlen(q, k_cache, v_cache, query_lens, seq_lens, block_tables, scale, return_lse):
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
    start = 0
    for b, (qlen, slen) in enumerate(zip(query_lens, seq_lens)):
        if qlen == 0:
            continue
        k = gather_kv(k_cache, block_tables[b], slen)
        v = gather_kv(v_cache, block_tables[b], slen)
        qs = q[start:start + qlen]
        rep = qs.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1).transpose(0, 1).float()
        v = v.repeat_interleave(rep, dim=1).transpose(0, 1).float()
        s = torch.matmul(qs.transpose(0, 1).float(), k.transpose(1, 2)) * scale  # [H, qlen, slen]
        qpos = torch.arange(slen - qlen, slen, device=q.device)[:, None]
        kpos = torch.arange(slen, device=q.device)[None, :]
        s = s.masked_fill(kpos > qpos, float("-inf"))
        m = torch.logsumexp(s, dim=-1, keepdim=True)
        o = torch.matmul(torch.exp(s - m), v)
        out[start:start + qlen] = o.transpose(0, 1).to(q.dtype)
        if lse is not None:
            lse[start:start + qlen] = m.squeeze(-1).transpose(0, 1)
        start += qlen
    return (out, lse) if return_lse else out


def entry_logit(q: torch.Tensor, k_e: torch.Tensor, scale: float) -> torch.Tensor:
    """ℓ = q · k_e · scale [T, H] for q [T, H, D] and each query's one extra key k_e [T, Hkv, D]
    (query head h reads kv head h // (H / Hkv)): NanoHammer's state entry."""
    rep = q.shape[1] // k_e.shape[1]
    return (q.float() * k_e.float().repeat_interleave(rep, dim=1)).sum(-1) * scale


def merge_entry(o_c: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k_e: torch.Tensor,
                v_e: torch.Tensor, scale: float) -> torch.Tensor:
    """Add one extra key/value per query to an attention result exactly, via its log-sum-exp.

    o_c [T, H, D], lse [T, H] (fp32) come from causal attention over the real tokens; k_e, v_e [T, Hkv, D]
    are each query's extra entry (NanoHammer's state entry, specs/nanohammer.md §7.3). Returns softmax over
    {entry} ∪ {tokens} applied to the values.
    """
    rep = q.shape[1] // v_e.shape[1]
    logit = entry_logit(q, k_e, scale)
    m = torch.maximum(lse, logit)
    w_c, w_e = torch.exp(lse - m)[..., None], torch.exp(logit - m)[..., None]
    v = v_e.float().repeat_interleave(rep, dim=1)
    return ((w_c * o_c.float() + w_e * v) / (w_c + w_e)).to(o_c.dtype)


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           seq_lens: torch.Tensor, scale: float, return_lse: bool = False,
           entry: tuple[torch.Tensor, torch.Tensor] | None = None):
    """One query per sequence q [B, H, D] over its first seq_lens[b] tokens, plus one extra key/value
    per sequence when `entry` = (k_e, v_e) [B, Hkv, D] is given (NanoHammer's state entry). No host sync:
    the context is gathered over the full block-table width and the tail masked, so it is also
    graph-capturable."""
    page = k_cache.shape[1]
    B, n_pages = block_tables.shape
    bt = block_tables.long()
    k = k_cache[bt].reshape(B, n_pages * page, *k_cache.shape[2:])
    v = v_cache[bt].reshape(B, n_pages * page, *v_cache.shape[2:])
    rep = q.shape[1] // k.shape[2]
    k = k.repeat_interleave(rep, dim=2).transpose(1, 2).float()  # [B, H, L, D]
    v = v.repeat_interleave(rep, dim=2).transpose(1, 2).float()
    mask = torch.arange(n_pages * page, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]
    s = torch.matmul(k, q.float()[:, :, :, None])[..., 0] * scale        # [B, H, L]
    s = s.masked_fill(~mask[:, None, :], float("-inf"))
    if entry is not None:                                                # one more key in front
        s = torch.cat([entry_logit(q, entry[0], scale)[..., None], s], dim=-1)
        v = torch.cat([entry[1].repeat_interleave(rep, dim=1).float()[:, :, None, :], v], dim=2)
    lse = torch.logsumexp(s, dim=-1)                                     # [B, H]
    o = torch.matmul(torch.exp(s - lse[..., None])[:, :, None, :], v)[:, :, 0, :].to(q.dtype)
    return (o, lse) if return_lse else o


def decode_step(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, k_cache: torch.Tensor,
                v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                scale: float, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None,
                eps: float = 1e-5, entry: tuple[torch.Tensor, torch.Tensor] | None = None,
                return_lse: bool = False):
    """A decode step's attention from the raw projection qkv [B, H + 2·Hkv, D]: QK-norm and RoPE, the
    step's k/v written to slot_mapping[b] (`rope_write_kv`), then `decode`."""
    qk = rope_write_kv(qkv, cos, sin, num_heads, k_cache, v_cache, slot_mapping, q_norm, k_norm, eps)
    return decode(qk[:, :num_heads], k_cache, v_cache, block_tables, seq_lens, scale, return_lse, entry)
