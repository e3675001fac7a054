"""CUDA-graph decode vs eager vs the reference forward, with padded batch sizes and slot reuse (GPU only)."""
import random

import pytest
import torch

from harness import Harness, assert_close, reference_logits
from hybridserve.engine.cuda_graphs import DecodeGraphs, PrefillGraphs
from hybridserve.engine.model_runner import build_meta

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from model_zoo import tiny_models  # noqa: E402


@pytest.fixture(params=sorted(tiny_models()), scope="module")
def model(request):
    return tiny_models()[request.param](torch.device("cuda"), torch.float32)


@pytest.mark.parametrize("feed", ["meta", "chunks"])   # graphs.run(BatchMeta) / run_chunks (the engine's)
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_graph_matches_eager_and_reference(model, batch, feed):
    rng = random.Random(batch)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 20))] for _ in range(batch)]
    conts = [[rng.randrange(vocab) for _ in range(6)] for _ in range(batch)]
    eager, graphed = Harness(model, num_pages=128), Harness(model, num_pages=128)
    graphs = DecodeGraphs(model, graphed.pools.view, max_bs=8, max_blocks=16)
    graphs.capture()
    got_e, got_g = [[] for _ in prompts], [[] for _ in prompts]
    se = [eager.new_seq() for _ in prompts]
    sg = [graphed.new_seq() for _ in prompts]
    for b, o in enumerate(eager.step(list(zip(se, prompts)))):
        got_e[b].append(o)
    for b, o in enumerate(graphed.step(list(zip(sg, prompts)))):
        got_g[b].append(o)
    for j in range(6):
        toks = [c[j] for c in conts]
        for b, o in enumerate(eager.step([(s, [t]) for s, t in zip(se, toks)])):
            got_e[b].append(o)
        # the graphed harness only books pages; the graph does the forward
        chunks = [graphed.book(s, [t]) for s, t in zip(sg, toks)]
        if feed == "meta":
            out = graphs.run(build_meta(chunks, graphed.pools.page_size, model.device))
        else:
            out = graphs.run_chunks(chunks, graphed.pools.page_size)
        assert torch.equal(graphs.last_argmax, out.argmax(-1))
        for b in range(batch):
            got_g[b].append(out[b:b + 1].clone())  # the graph output buffer is reused by the next replay
    for b in range(batch):
        ref = reference_logits(model, prompts[b] + conts[b])
        # fp32 attention dots run as TF32 inside the Triton kernels: ~1e-3 against the fp32 reference
        assert_close(torch.cat(got_e[b]), ref, 3e-3)
        assert_close(torch.cat(got_g[b]), torch.cat(got_e[b]), 1e-4)


@pytest.mark.parametrize("first_wants_logits", [True, False])
def test_prefill_graph_matches_eager(model, first_wants_logits):
    """A prompt in two chunks (5 tokens: bucket 32; then 40: bucket 64) replayed from prefill graphs gives
    the eager last-token logits and leaves the same state/KV behind (decode continues identically), while
    another live sequence's slot and pages stay bit-identical. A first chunk that wants no logits (a
    prompt's middle chunk) replays the same graph and returns none."""
    rng = random.Random(7)
    vocab = model.config.vocab_size
    other = [rng.randrange(vocab) for _ in range(9)]
    chunks = [[rng.randrange(vocab) for _ in range(n)] for n in (5, 40)]
    cont = [rng.randrange(vocab) for _ in range(3)]
    eager, graphed = Harness(model, num_pages=128), Harness(model, num_pages=128)
    graphs = PrefillGraphs(model, graphed.pools.view, max_blocks=32, buckets=(32, 64))
    graphs.capture()
    oe, og = eager.new_seq(), graphed.new_seq()
    eager.step([(oe, other)])
    graphed.step([(og, other)])
    before_state = graphed.live_state()
    kv_before = [(k.clone(), v.clone()) for k, v in graphed.pools.view.kv]
    se, sg = eager.new_seq(), graphed.new_seq()
    for i, chunk in enumerate(chunks):
        want = eager.step([(se, chunk)])[0][-1:]
        booked = graphed.book(sg, chunk)
        booked.want_logits = first_wants_logits or i > 0
        meta = build_meta([booked], graphed.pools.page_size, model.device)
        bucket = graphs.bucket_for(meta)
        assert bucket == (32 if len(chunk) < 32 else 64)
        got = graphs.run(meta, bucket)
        if booked.want_logits:
            assert_close(got, want, 1e-4)
        else:
            assert got.shape[0] == 0
    for g, t in graphed.live_state().items():   # the other sequence's slot (and any free slot) untouched
        slot = og.slot - 1
        assert torch.equal(t[:, slot], before_state[g][:, slot]), g
    for (k, v), (k0, v0) in zip(graphed.pools.view.kv, kv_before):
        for p in og.pages:
            assert torch.equal(k[p], k0[p]) and torch.equal(v[p], v0[p])
    for t in cont:
        assert_close(graphed.step([(sg, [t])])[0], eager.step([(se, [t])])[0], 1e-4)


@pytest.mark.parametrize("prompt_wants_logits", [True, False])
def test_mixed_step_as_two_graphs_matches_eager(model, prompt_wants_logits):
    """A step of decode rows beside one prompt chunk (a request admitted while others decode) replays the
    decode graph for the rows and the chunk's prefill graph (engine/model_runner.py `_run_split`): the same
    logits, in chunk order, as one eager forward, and the same caches after (decoding continues alike)."""
    from hybridserve.engine.model_runner import ModelRunner
    rng = random.Random(11)
    vocab = model.config.vocab_size
    eager, graphed = Harness(model, num_pages=128), Harness(model, num_pages=128)
    runner = ModelRunner(model, graphed.pools, max_model_len=128, max_num_seqs=4, max_chunk_tokens=64)
    olds = [[rng.randrange(vocab) for _ in range(n)] for n in (6, 11, 3)]
    pe, pg = [eager.new_seq() for _ in olds], [graphed.new_seq() for _ in olds]
    for se, sg, toks in zip(pe, pg, olds):
        eager.step([(se, toks)])
        graphed.step([(sg, toks)])
    prompt = [rng.randrange(vocab) for _ in range(20)]
    ne, ng = eager.new_seq(), graphed.new_seq()
    nxt = [rng.randrange(vocab) for _ in olds]
    # the prompt chunk sits between decode rows, so its logit row must land in the middle
    want = eager.step([(pe[0], [nxt[0]]), (ne, prompt), (pe[1], [nxt[1]]), (pe[2], [nxt[2]])])
    chunks = [graphed.book(pg[0], [nxt[0]]), graphed.book(ng, prompt), graphed.book(pg[1], [nxt[1]]),
              graphed.book(pg[2], [nxt[2]])]
    chunks[1].want_logits = prompt_wants_logits
    got = runner.run(chunks)
    rows = [want[0], want[1][-1:], want[2], want[3]] if prompt_wants_logits else [want[0], want[2], want[3]]
    assert got.shape[0] == len(rows)
    assert_close(got, torch.cat(rows), 1e-4)
    assert runner.last_argmax is None       # the engine samples this step from the logits
    for _ in range(3):
        toks = [rng.randrange(vocab) for _ in range(4)]
        seqs_e, seqs_g = pe + [ne], pg + [ng]
        want = eager.step([(s, [t]) for s, t in zip(seqs_e, toks)])
        got = runner.run([graphed.book(s, [t]) for s, t in zip(seqs_g, toks)])
        assert_close(got, torch.cat(want), 1e-4)
