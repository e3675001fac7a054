"""A step's packed inputs from their pinned host buffer into the device buffer the graphs read
(engine/cuda_graphs.py `PackedInputs`): the reference, as device copies. `kernels/input_fetch_triton.py` does the
same from one kernel that reads the pinned buffer itself.

    fetch(host, dev, end, table=None, gather=None)

host: the pinned host buffer, dev: the device buffer (uint8, same size, a multiple of 16 bytes). Without a
synchronisation, dev takes
- bytes [0, end) of host (end a multiple of 4);
- table = (offset, stride, rows, cols), in int32 words: the first `cols` words of each of `rows` rows of
  `stride` words from word `offset` (a block table's used columns; the rest of its rows keep what they held);
- gather = (dst, src, n, values), in int64 elements: element dst + i is values[host's element src + i] for
  i < n, in place of host's dst + i (the tokens an async-scheduled step takes from the previous step's, which
  are on the device). [src, src + n) lies in [0, end).
"""
from __future__ import annotations

import torch


def check(host: torch.Tensor, dev: torch.Tensor, end: int, table: tuple | None, gather: tuple | None) -> None:
    assert host.dtype == dev.dtype == torch.uint8 and host.numel() == dev.numel() and host.numel() % 16 == 0
    assert 0 <= end <= host.numel() and end % 4 == 0
    if table is not None:
        off, stride, rows, cols = table
        assert 0 <= cols <= stride and 4 * (off + rows * stride) <= host.numel()
    if gather is not None:
        dst, src, n, values = gather
        assert 8 * (src + n) <= end and 8 * (dst + n) <= host.numel() and values.dtype == torch.int64


def warm(host: torch.Tensor, dev: torch.Tensor) -> None:
    """Nothing to compile here (the Triton file compiles its variants)."""


def fetch(host: torch.Tensor, dev: torch.Tensor, end: int, table: tuple[int, int, int, int] | None = None,
          gather: tuple[int, int, int, torch.Tensor] | None = None) -> None:
    check(host, dev, end, table, gather)
    if end:
        dev[:end].copy_(host[:end], non_blocking=True)
    if table is not None and table[2] and table[3]:
        off, stride, rows, cols = table
        part = slice(off, off + rows * stride)
        dev.view(torch.int32)[part].view(rows, stride)[:, :cols].copy_(
            host.view(torch.int32)[part].view(rows, stride)[:, :cols], non_blocking=True)
    if gather is not None and gather[2]:
        dst, src, n, values = gather
        d64 = dev.view(torch.int64)
        torch.index_select(values, 0, d64[src:src + n], out=d64[dst:dst + n])
