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


# Opt-in decode knobs, each graph vs eager vs reference: the o projection held in registers before the attention
# ends (fused_triton.RESIDENT_AFTER_BLOCK, batch 1) with the token mixer's kernels releasing the next launch before
# their waits (pdl.EARLY_MIXER); QK-norm, RoPE, KV write and attention in one kernel, each row's own key from
# registers (layers.ATTN_STEP_FUSED); each attention split program's first k/v tile read before its PDL wait
# (paged_attention_triton.KV_EARLY); the split merge and the o projection in one kernel (layers.ATTN_MERGE_O,
# batch 1: its fp32 output into the next residual add).
KNOBS = {"resident_o": [("kernels.fused_triton", "RESIDENT_AFTER_BLOCK"), ("kernels.pdl", "EARLY_MIXER")],
         "merge_o": [("models.layers", "ATTN_MERGE_O")],
         "attention_in_one_kernel": [("models.layers", "ATTN_STEP_FUSED")],
         "kv_early": [("kernels.paged_attention_triton", "KV_EARLY")],
         # L2 eviction hints (no effect on results): weights with the default policy, k/v loads evict-last
         "weight_evict_normal": [("kernels.fused_triton", "WEIGHT_EVICT", "")],
         "kv_evict_last": [("kernels.paged_attention_triton", "KV_EVICT", "evict_last")],
         # Kotodama's routing: the committed sources read before the PDL wait at one token row
         "route_early": [("kernels.attn_res_triton", "COMMITTED_EARLY_ROWS", 1)],
         # NanoHammer's state entry waited for at the layer's start; its token_to_state projection on cuBLAS
         "entry_wait_early": [("models.llama", "ENTRY_AT_ATTENTION", False)],
         "t2s_cublas": [("models.nanohammer", "TOKEN_TO_STATE_GEMV", False),
                        ("models.nanohammer", "TOKEN_STATE_TABLE", False)],
         # ... as the side GEMV rather than a row of the token table; the decode readout and fold GEMVs as kernels
         "state_table_off": [("models.nanohammer", "TOKEN_STATE_TABLE", False)],
         "decode_chain_off": [("models.nanohammer", "DECODE_CHAIN", False)],
         "entries_after_gather": [("models.nanohammer", "ENTRIES_BEFORE_GATHER", False)],
         "fold_cell_rows_16": [("kernels.state_token_triton", "FOLD_IN_CELL_ROWS", 16)],
         "side_pdl": [("models.nanohammer", "SIDE_PLAIN", False)],
         "no_table_no_chain": [("models.nanohammer", "TOKEN_STATE_TABLE", False),
                               ("models.nanohammer", "DECODE_CHAIN", False)]}


@pytest.mark.parametrize("knobs", sorted(KNOBS))
@pytest.mark.parametrize("batch", [1, 3])
def test_graph_with_knob_matches(model, batch, knobs, monkeypatch):
    """test_graph_matches_eager_and_reference's checks with one opt-in knob set (KNOBS) turned on (or set to
    its entry's value)."""
    import importlib
    for mod, attr, *value in KNOBS[knobs]:
        monkeypatch.setattr(importlib.import_module(f"hybridserve.{mod}"), attr, value[0] if value else True)
    test_graph_matches_eager_and_reference(model, batch, "chunks")


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
        bucket = graphs.bucket_for([booked])
        assert bucket == (1, 32 if len(chunk) < 32 else 64)
        got = graphs.run([booked], bucket)
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


def replays(runner, monkeypatch) -> list:
    """Records the graphs a runner replays: ("decode", rows) / ("prefill", (capacity, bucket))."""
    seen = []
    dec, pre = runner.graphs.run_chunks, runner.prefill_graphs.run
    monkeypatch.setattr(runner.graphs, "run_chunks", lambda chunks, *a, **k: seen.append(("decode", len(chunks)))
                        or dec(chunks, *a, **k))
    monkeypatch.setattr(runner.prefill_graphs, "run", lambda chunks, bucket: seen.append(("prefill", bucket))
                        or pre(chunks, bucket))
    return seen


def paired_runner(model, monkeypatch, rng, lens, max_num_seqs: int):
    """An eager harness and a graphed one driven through a ModelRunner (its replays recorded by `replays`), with
    one request of each length in `lens` prefilled alike in both: (eager, graphed, runner, seen, the eager
    requests, the graphed ones)."""
    from hybridserve.engine.model_runner import ModelRunner
    vocab = model.config.vocab_size
    eager, graphed = Harness(model, num_pages=128), Harness(model, num_pages=128)
    runner = ModelRunner(model, graphed.pools, max_model_len=128, max_num_seqs=max_num_seqs, max_chunk_tokens=64)
    seen = replays(runner, monkeypatch)
    olds = [[rng.randrange(vocab) for _ in range(n)] for n in lens]
    pe, pg = [eager.new_seq() for _ in olds], [graphed.new_seq() for _ in olds]
    for se, sg, toks in zip(pe, pg, olds):
        eager.step([(se, toks)])
        graphed.step([(sg, toks)])
    return eager, graphed, runner, seen, pe, pg


@pytest.mark.parametrize("prompt_wants_logits", [True, False])
def test_mixed_step_as_two_graphs_matches_eager(model, prompt_wants_logits, monkeypatch):
    """A step of decode rows beside one prompt chunk (a request admitted while others decode) whose rows
    would move it past the chunk's token bucket (20 + 3 tokens: bucket 32; 30 + 3: 64) replays the decode
    graph for the rows and the chunk's prefill graph: the same logits, in chunk order, as one eager forward,
    and the same caches after (decoding continues alike). A 20-token chunk takes the rows into its graph."""
    rng = random.Random(11)
    vocab = model.config.vocab_size
    eager, graphed, runner, seen, pe, pg = paired_runner(model, monkeypatch, rng, (6, 11, 3), 4)
    prompt = [rng.randrange(vocab) for _ in range(30)]
    ne, ng = eager.new_seq(), graphed.new_seq()
    nxt = [rng.randrange(vocab) for _ in pe]
    # the prompt chunk sits between decode rows, so its logit row must land in the middle
    want = eager.step([(pe[0], [nxt[0]]), (ne, prompt), (pe[1], [nxt[1]]), (pe[2], [nxt[2]])])
    chunks = [graphed.book(pg[0], [nxt[0]]), graphed.book(ng, prompt), graphed.book(pg[1], [nxt[1]]),
              graphed.book(pg[2], [nxt[2]])]
    chunks[1].want_logits = prompt_wants_logits
    got = runner.run(chunks)
    assert seen == [("prefill", (1, 32)), ("decode", 3)]
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


@pytest.mark.parametrize("rows_first", [True, False])
def test_batched_prefill_graph_matches_eager(model, rows_first, monkeypatch):
    """Prompts arriving together, beside decode rows: a step of two whole prompts, a prompt's first chunk
    (no logits) and decode rows is one prefill-graph replay (capacity 6 sequences: the engine's 6; the rest
    empty), with the
    eager forward's logits in chunk order; the next step (the rest of that prompt, a new prompt, the rows)
    too; decoding then continues alike. A request outside the steps keeps its slot and pages. (3e-4: the graph's
    matmuls run over the bucket's 32 rows, the eager ones over the step's 18, and TF32 rounds them apart.)"""
    rng = random.Random(13)
    vocab = model.config.vocab_size
    eager, graphed, runner, seen, pe, pg = paired_runner(model, monkeypatch, rng, (6, 11, 4), 6)
    idle_state = graphed.live_state()
    idle_kv = [(k[pg[2].pages].clone(), v[pg[2].pages].clone()) for k, v in graphed.pools.view.kv]
    a, b1, b2, c = ([rng.randrange(vocab) for _ in range(n)] for n in (9, 7, 5, 3))
    new_e, new_g = [eager.new_seq() for _ in range(3)], [graphed.new_seq() for _ in range(3)]
    nxt = [rng.randrange(vocab) for _ in range(2)]
    rows_e, rows_g = [(pe[i], [nxt[i]]) for i in range(2)], [(pg[i], [nxt[i]]) for i in range(2)]
    prompts_e, prompts_g = [(new_e[0], a), (new_e[1], b1)], [(new_g[0], a), (new_g[1], b1)]
    feeds_e = rows_e + prompts_e if rows_first else prompts_e[:1] + rows_e + prompts_e[1:]
    feeds_g = rows_g + prompts_g if rows_first else prompts_g[:1] + rows_g + prompts_g[1:]
    want = eager.step(feeds_e)
    chunks = [graphed.book(s, t) for s, t in feeds_g]
    b_index = [s for s, _ in feeds_g].index(new_g[1])
    chunks[b_index].want_logits = False
    got = runner.run(chunks)
    assert seen == [("prefill", (6, 32))]
    rows = [w[-1:] for i, w in enumerate(want) if i != b_index]
    assert_close(got, torch.cat(rows), 3e-4)
    # the rest of prompt b, a new prompt c and the rows again
    nxt = [rng.randrange(vocab) for _ in range(3)]
    want = eager.step([(new_e[1], b2), (pe[0], [nxt[0]]), (new_e[2], c), (pe[1], [nxt[1]]), (new_e[0], [nxt[2]])])
    got = runner.run([graphed.book(s, t) for s, t in [(new_g[1], b2), (pg[0], [nxt[0]]), (new_g[2], c),
                                                       (pg[1], [nxt[1]]), (new_g[0], [nxt[2]])]])
    assert seen[1:] == [("prefill", (6, 32))]
    assert_close(got, torch.cat([w[-1:] for w in want]), 3e-4)
    slot = pg[2].slot - 1
    for g, t in graphed.live_state().items():
        assert torch.equal(t[:, slot], idle_state[g][:, slot]), g
    for (k, v), (k0, v0) in zip(graphed.pools.view.kv, idle_kv):
        assert torch.equal(k[pg[2].pages], k0) and torch.equal(v[pg[2].pages], v0)
    seqs_e, seqs_g = pe + new_e, pg + new_g
    for _ in range(3):
        toks = [rng.randrange(vocab) for _ in seqs_e]
        want = eager.step([(s, [t]) for s, t in zip(seqs_e, toks)])
        got = runner.run([graphed.book(s, [t]) for s, t in zip(seqs_g, toks)])
        assert_close(got, torch.cat(want), 3e-4)
