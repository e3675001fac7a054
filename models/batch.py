"""Batch metadata handed to a model forward: a packed (varlen) batch of sequences.

Every sequence contributes `query_len` new tokens (1 for decode, a chunk for prefill) that continue
from `seq_len - query_len` tokens already held in its KV pages and/or state slot.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BatchMeta:
    input_ids: torch.Tensor       # [T] int64, the new tokens of all sequences, packed
    positions: torch.Tensor       # [T] int64, absolute position of each token in its sequence
    cu_seqlens: torch.Tensor      # [B+1] int32, offsets of each sequence's tokens in input_ids
    seq_lens: torch.Tensor        # [B] int32, tokens in context after this step (cached + new)
    block_tables: torch.Tensor    # [B, max_blocks] int32 page ids; unused entries point at page 0
    slot_mapping: torch.Tensor    # [T] int64 flat KV destination (page * page_size + offset)
    slot_ids: torch.Tensor        # [B] int64 state slot per sequence; 0 = pad slot
    logits_indices: torch.Tensor  # [N] int64 rows of the packed tokens that need logits
    query_lens_cpu: list[int]     # host copies for loops and shapes
    seq_lens_cpu: list[int]
    is_decode: bool = False       # every sequence has exactly one new token

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])
