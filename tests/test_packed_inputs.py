"""A step's packed inputs brought in (kernels/input_fetch*.py, engine/cuda_graphs.py PackedInputs): the
reference's result written out by hand on CPU, the Triton kernel against the reference (under the interpreter
on CPU, compiled on a GPU reading a pinned host buffer), and the packed inputs of a decode graph on a GPU."""
from __future__ import annotations

import pytest
import torch
from triton_mode import DEVICES, HAS_CUDA, fresh_process_test

from hybridserve.kernels import input_fetch as ref
from hybridserve.kernels import input_fetch_triton as tr

test_cpu_kernels_in_fresh_process = fresh_process_test(__file__)

ROWS, STRIDE = 5, 40          # a block table of 5 rows of 40 columns after a 48-word (192-byte) head


def buffers(device: str, pinned: bool = False):
    """(host, dev): host random bytes, dev filled with a marker (0xEE) so that what was not brought in shows."""
    g = torch.Generator().manual_seed(0)
    size = 192 + ROWS * STRIDE * 4 + 16 * 3
    host = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g)
    host.view(torch.int64)[16:24] = torch.tensor([3, 0, 6, 1, 1, 5, 2, 4])     # previous-step rows (src 16)
    if pinned:
        host = host.pin_memory()
    dev = torch.full((size,), 0xEE, dtype=torch.uint8, device=device)
    return host, dev


def test_reference_by_hand():
    host, dev = buffers("cpu")
    values = torch.arange(100, 107, dtype=torch.int64)
    ref.fetch(host, dev, 192, (48, STRIDE, 3, 7), (2, 16, 5, values))
    h32, d32 = host.view(torch.int32), dev.view(torch.int32)
    expect = torch.full_like(dev, 0xEE).view(torch.int32)
    expect[:48] = h32[:48]
    for r in range(3):
        expect[48 + r * STRIDE:48 + r * STRIDE + 7] = h32[48 + r * STRIDE:48 + r * STRIDE + 7]
    expect.view(torch.int64)[2:7] = values[torch.tensor([3, 0, 6, 1, 1])]
    assert torch.equal(d32, expect)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["flat", "table", "gather", "all", "wide", "nothing"])
def test_kernel_matches_reference(device, case):
    host, dev = buffers(device, pinned=device == "cuda")
    want = dev.clone()
    values = torch.arange(100, 107, dtype=torch.int64, device=device)
    end, table, gather = {
        "flat": (192, None, None),
        "table": (0, (48, STRIDE, ROWS, 33), None),
        "gather": (192, None, (0, 16, 8, values)),
        "all": (192, (48, STRIDE, 4, STRIDE), (3, 16, 3, values)),
        "wide": (host.numel(), None, None),
        "nothing": (0, (48, STRIDE, 0, 5), None),
    }[case]
    tr.fetch(host, dev, end, table, gather)
    ref.fetch(host, want, end, table, gather)
    if device == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(dev.cpu(), want.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_gather_over_several_blocks(device):
    """A batch of more tokens than program 0 gathers at a time (tr.GATHER_BLOCK)."""
    g = torch.Generator().manual_seed(1)
    n = 2 * tr.GATHER_BLOCK + 7
    host = torch.zeros(16 * (n + 64), dtype=torch.uint8)
    h64 = host.view(torch.int64)
    h64[:n] = torch.randint(0, 10**6, (n,), generator=g)
    h64[n:2 * n] = torch.randint(0, 999, (n,), generator=g)
    if device == "cuda":
        host = host.pin_memory()
    values = torch.arange(1000, dtype=torch.int64, device=device) * 3
    dev = torch.zeros(host.numel(), dtype=torch.uint8, device=device)
    want = dev.clone()
    tr.fetch(host, dev, 16 * n, None, (0, n, n, values))
    ref.fetch(host, want, 16 * n, None, (0, n, n, values))
    assert torch.equal(dev.cpu(), want.cpu())
    assert torch.equal(dev.view(torch.int64)[:n].cpu(), 3 * host.view(torch.int64)[n:2 * n])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_packed_inputs_send_on_gpu():
    """PackedInputs.send on a GPU: the kernel's result equals the reference's, and a refill after `arrays()`
    (which waits for the reads of the last fill) comes in as written."""
    from hybridserve.engine.cuda_graphs import PackedInputs
    parts = {"i64": (torch.long, (5, 4)), "seq_lens": (torch.int32, (4,)), "block_tables": (torch.int32, (4, 300))}
    p = PackedInputs(torch.device("cuda"), parts)
    assert p._ops is tr
    assert not p.device_bytes.any()            # the variants' warm-up leaves the buffer as it was
    prev = torch.arange(50, 58, dtype=torch.int64, device="cuda")
    for step in range(3):
        a = p.arrays()
        a["i64"][:] = torch.arange(20).view(5, 4).numpy() + 100 * step
        a["i64"][4, :3] = [7, 2, step]
        a["seq_lens"][:] = [step + 1] * 4
        a["block_tables"][:] = torch.arange(1200, dtype=torch.int32).view(4, 300).numpy() + step
        p.send(p.offsets["block_tables"], ("block_tables", 3, 17 + step), (0, 16, 3, prev))
        p.sent()
        torch.cuda.synchronize()
        dev = p.dev
        assert dev["i64"][0, :3].tolist() == [57, 52, 50 + step]
        assert torch.equal(dev["i64"][1:].cpu(), torch.as_tensor(a["i64"][1:]))
        assert torch.equal(dev["i64"][0, 3:].cpu(), torch.as_tensor(a["i64"][0, 3:]))
        assert dev["seq_lens"].tolist() == [step + 1] * 4
        used = slice(0, 17 + step)
        assert torch.equal(dev["block_tables"][:3, used].cpu(), torch.as_tensor(a["block_tables"][:3, used]))
