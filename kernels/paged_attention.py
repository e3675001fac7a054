"""Attention over a paged KV cache (plain PyTorch reference).

k_cache/v_cache: [num_pages, page_size, Hkv, D]. A sequence's tokens live in the pages listed by its
block table row, in order. New tokens are written first (`write_kv`), then every query attends causally
to all tokens of its sequence up to its own position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
    """Varlen causal attention of packed queries q [T, H, D] over each sequence's pages.

    Returns out [T, H, D] (and the log-sum-exp [T, H] in fp32 when return_lse, for merging an extra
    key into the softmax exactly).
    """
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
    if meta.is_decode and not return_lse:
        return decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale)
    start = 0
    for b, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if qlen == 0:
            continue
        k = gather_kv(k_cache, meta.block_tables[b], slen)
        v = gather_kv(v_cache, meta.block_tables[b], slen)
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


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
           seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence q [B, H, D] over its first seq_lens[b] tokens. No host sync: the context
    is gathered over the full block-table width and the tail masked, so it is also graph-capturable."""
    page = k_cache.shape[1]
    B, n_pages = block_tables.shape
    bt = block_tables.long()
    k = k_cache[bt].reshape(B, n_pages * page, *k_cache.shape[2:])
    v = v_cache[bt].reshape(B, n_pages * page, *v_cache.shape[2:])
    rep = q.shape[1] // k.shape[2]
    k = k.repeat_interleave(rep, dim=2).transpose(1, 2)  # [B, H, L, D]
    v = v.repeat_interleave(rep, dim=2).transpose(1, 2)
    mask = torch.arange(n_pages * page, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]
    o = F.scaled_dot_product_attention(
        q[:, :, None, :].to(k.dtype), k, v, attn_mask=mask[:, None, None, :], scale=scale
    )
    return o[:, :, 0, :].to(q.dtype)
