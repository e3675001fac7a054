"""The batched prefill graphs' input layout (engine/cuda_graphs.py `fill_prefill_inputs`): a step of prompt
chunks and decode rows, padded to a graph's capacity with sequences of no tokens and a pad sequence on the pad
slot, gives every architecture the same logits and leaves the same caches as the unpadded step. Runs the
model eagerly on CPU over the padded layout (the graph replays that layout on the GPU: tests/test_gpu_graphs.py)."""
import random

import numpy as np
import pytest
import torch

from harness import Harness, assert_close
from hybridserve.engine.cuda_graphs import fill_prefill_inputs, padded_prefill_meta
from model_zoo import tiny_models


@pytest.fixture(params=sorted(tiny_models()), scope="module")
def model(request):
    return tiny_models()[request.param](torch.device("cpu"), torch.float32)


def padded_forward(h: Harness, chunks, capacity: int, bucket: int) -> torch.Tensor:
    a64 = np.full((3, bucket + 8), 7, dtype=np.int64)        # stale values past the bucket are never read
    s64 = np.full(2 * capacity + 1, 5, dtype=np.int64)
    a32 = np.full(2 * capacity + 3, 3, dtype=np.int32)
    bt = np.zeros((capacity + 1, 16), dtype=np.int32)
    _, wanted = fill_prefill_inputs(chunks, bucket, h.pools.page_size, a64, s64, a32, bt)
    meta = padded_prefill_meta(torch.from_numpy(a64), torch.from_numpy(s64), torch.from_numpy(a32),
                               torch.from_numpy(bt), bucket)
    with torch.inference_mode():
        return h.model.forward(meta, h.pools.view)[:wanted]


@pytest.mark.parametrize("capacity", [4, 7])
def test_padded_prefill_step_matches_unpadded(model, capacity):
    rng = random.Random(capacity)
    vocab = model.config.vocab_size
    plain, padded = Harness(model, num_pages=128), Harness(model, num_pages=128)
    olds = [[rng.randrange(vocab) for _ in range(n)] for n in (6, 3)]
    idle = [rng.randrange(vocab) for _ in range(4)]          # a live request outside the step
    sp, sq = [plain.new_seq() for _ in range(4)], [padded.new_seq() for _ in range(4)]
    for h, seqs in ((plain, sp), (padded, sq)):
        h.step([(seqs[0], olds[0]), (seqs[1], olds[1]), (seqs[3], idle)])
    idle_state = padded.live_state()
    idle_kv = [(k[sq[3].pages].clone(), v[sq[3].pages].clone()) for k, v in padded.pools.view.kv]
    a, b1, b2 = ([rng.randrange(vocab) for _ in range(n)] for n in (7, 5, 4))
    nxt = [rng.randrange(vocab) for _ in range(2)]
    # decode row, a whole prompt, a prompt's first chunk (no logits), decode row
    feeds_p = [(sp[0], [nxt[0]]), (sp[2], a), (plain.new_seq(), b1), (sp[1], [nxt[1]])]
    feeds_q = [(sq[0], [nxt[0]]), (sq[2], a), (padded.new_seq(), b1), (sq[1], [nxt[1]])]
    want = plain.step(feeds_p)
    chunks = [padded.book(s, t) for s, t in feeds_q]
    chunks[2].want_logits = False
    got = padded_forward(padded, chunks, capacity, 32)
    assert got.shape[0] == 3
    assert_close(got, torch.cat([want[0], want[1][-1:], want[3]]), 1e-5)
    # the second chunk of prompt b, alone in a step
    want_b = plain.step([(feeds_p[2][0], b2)])[0][-1:]
    assert_close(padded_forward(padded, [padded.book(feeds_q[2][0], b2)], capacity, 32), want_b, 1e-5)
    # the request outside the step kept its slot and pages
    slot = sq[3].slot - 1
    for g, t in padded.live_state().items():
        assert torch.equal(t[:, slot], idle_state[g][:, slot]), g
    for (k, v), (k0, v0) in zip(padded.pools.view.kv, idle_kv):
        assert torch.equal(k[sq[3].pages], k0) and torch.equal(v[sq[3].pages], v0)
    # caches as the unpadded steps left them: decoding continues alike
    seqs_p, seqs_q = [sp[0], sp[1], sp[2], feeds_p[2][0], sp[3]], [sq[0], sq[1], sq[2], feeds_q[2][0], sq[3]]
    for _ in range(2):
        toks = [rng.randrange(vocab) for _ in seqs_p]
        assert_close(torch.cat(padded.step(list(zip(seqs_q, [[t] for t in toks])))),
                     torch.cat(plain.step(list(zip(seqs_p, [[t] for t in toks])))), 1e-5)
