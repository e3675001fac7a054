"""Sampler: exact logits processing, the support of each truncation, seeding, logprobs, one host transfer."""
from __future__ import annotations

import warnings

import pytest
import torch

from hybridserve.engine.request import SamplingParams
from hybridserve.engine.sampler import (Sampler, SamplingTensors, apply_penalties_and_temperature, apply_truncation,
                                        make_generator)
from hybridserve.kernels.sampling import truncation_floor

LOGITS6 = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0])   # softmax ≈ .64 .23 .086 .032 .012 .004


def run(logits, params, outputs=None, prompts=None, generators=None, stop_ids=None, sampler=Sampler()):
    n = len(params)
    return sampler(logits, params, outputs or [[] for _ in range(n)], prompts or [[] for _ in range(n)],
                   generators or [None] * n, stop_ids)


def support(params: SamplingParams, logits=LOGITS6, draws=4000) -> set[int]:
    """Tokens sampled from `draws` copies of one row in one batch."""
    out = run(logits.expand(draws, -1), [params] * draws)
    return set(out.token_ids)


def test_greedy_is_argmax_without_randomness():
    torch.manual_seed(0)
    logits = torch.randn(8, 100, dtype=torch.bfloat16)
    params = [SamplingParams(temperature=0.0)] * 8
    assert run(logits, params).token_ids == logits.float().argmax(-1).tolist()
    # Greedy rows ignore the truncation knobs and the RNG, also inside a mixed batch.
    mixed = [SamplingParams(temperature=0.0, top_k=3, top_p=0.5) if i % 2 else SamplingParams(temperature=1.5)
             for i in range(8)]
    for _ in range(3):
        ids = run(logits, mixed).token_ids
        assert ids[1::2] == logits.float().argmax(-1)[1::2].tolist()


def test_default_sampling_reaches_every_token():
    assert support(SamplingParams()) == set(range(6))


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(top_k=1), {0}),
    (SamplingParams(top_k=3), {0, 1, 2}),
    (SamplingParams(top_k=3, temperature=5.0), {0, 1, 2}),
    (SamplingParams(top_p=0.8), {0, 1}),            # .64 < .8 <= .87
    (SamplingParams(top_p=0.9), {0, 1, 2}),         # .87 < .9 <= .95
    (SamplingParams(top_p=0.5), {0}),
    (SamplingParams(min_p=0.1), {0, 1, 2}),         # .086 / .64 = .135 kept, .032 / .64 = .05 dropped
    (SamplingParams(min_p=0.2), {0, 1}),            # .23 / .64 = .37 kept, .135 dropped
    (SamplingParams(min_p=0.4), {0}),
    (SamplingParams(top_k=4, top_p=0.9), {0, 1, 2}),   # top_p over the top-4 renormalised mass
])
def test_truncation_support(params, expected):
    assert support(params) == expected


def test_truncation_masks_exactly():
    logits = LOGITS6.expand(4, -1)
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.9), SamplingParams(min_p=0.2), SamplingParams()]
    t = SamplingTensors.build(params, [[]] * 4, [[]] * 4, None, 6, "cpu")
    kept = torch.isfinite(apply_truncation(logits, t))
    assert kept.tolist() == [[True, True, False, False, False, False],
                             [True, True, True, False, False, False],
                             [True, True, False, False, False, False],
                             [True] * 6]
    # Kept logits are unchanged (truncation renormalises through softmax only).
    out = apply_truncation(logits, t)
    assert torch.equal(out[kept], logits[kept])


def test_top_k_keeps_ties():
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    t = SamplingTensors.build([SamplingParams(top_k=1)], [[]], [[]], None, 4, "cpu")
    assert torch.isfinite(apply_truncation(logits, t)).tolist() == [[False, True, True, False]]


def test_temperature_sharpens_and_flattens():
    draws = 20000
    cold = run(LOGITS6.expand(draws, -1), [SamplingParams(temperature=0.25)] * draws).token_ids
    hot = run(LOGITS6.expand(draws, -1), [SamplingParams(temperature=4.0)] * draws).token_ids
    p_cold = torch.softmax(LOGITS6 / 0.25, -1)[0].item()
    p_hot = torch.softmax(LOGITS6 / 4.0, -1)[0].item()
    assert abs(cold.count(0) / draws - p_cold) < 0.02
    assert abs(hot.count(0) / draws - p_hot) < 0.02


def test_sample_frequencies_match_softmax():
    draws = 40000
    ids = torch.tensor(run(LOGITS6.expand(draws, -1), [SamplingParams()] * draws).token_ids)
    freq = torch.bincount(ids, minlength=6).float() / draws
    assert torch.allclose(freq, LOGITS6.softmax(-1), atol=0.01)


def test_penalties_follow_the_exact_formulas():
    torch.manual_seed(1)
    vocab = 12
    logits = torch.randn(3, vocab) * 3
    params = [SamplingParams(repetition_penalty=1.3, temperature=0.7),
              SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
              SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.4, presence_penalty=1.0)]
    prompts = [[1, 2, 2], [3, 4], [5, 0]]
    outputs = [[2, 6, 6, 7], [4, 4, 4, 8], [0, 9, 9]]
    t = SamplingTensors.build(params, outputs, prompts, None, vocab, "cpu")
    got = apply_penalties_and_temperature(logits, t)

    expected = logits.clone()
    for row, (p, prompt, output) in enumerate(zip(params, prompts, outputs)):
        for tok in set(prompt) | set(output):
            x = expected[row, tok]
            expected[row, tok] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for tok in set(output):
            expected[row, tok] -= p.frequency_penalty * output.count(tok) + p.presence_penalty
        expected[row] /= p.temperature
    assert torch.allclose(got, expected, atol=1e-5)


def test_logits_processing_does_not_modify_input():
    logits = torch.randn(2, 10)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=2.0, temperature=0.5, top_k=3),
              SamplingParams(frequency_penalty=1.0, min_p=0.1, top_p=0.5)]
    run(logits, params, outputs=[[1, 2], [3, 3]], prompts=[[4], [5]])
    assert torch.equal(logits, before)


def test_min_tokens_blocks_stop_ids():
    logits = torch.tensor([[0.0, 1.0, 9.0, 5.0]] * 3)   # id 2 (EOS) is the argmax
    params = [SamplingParams(temperature=0.0, min_tokens=3),
              SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[3]),
              SamplingParams(temperature=0.0, min_tokens=2)]
    outputs = [[7, 7], [7], [7, 7]]
    out = run(logits, params, outputs=outputs, stop_ids=[{2}, {2}, {2}])
    assert out.token_ids == [3, 1, 2]   # row 0: EOS masked; row 1: EOS and stop id 3 masked; row 2: min reached
    # Sampled rows cannot draw a banned id either.
    draws = 2000
    out = run(logits[:1].expand(draws, -1), [SamplingParams(min_tokens=1)] * draws, stop_ids=[{2, 3}] * draws)
    assert set(out.token_ids) <= {0, 1}


def test_seeded_rows_reproducible_regardless_of_batch():
    torch.manual_seed(2)
    vocab, steps = 1000, 12
    logits = torch.randn(steps, vocab)
    seeded = SamplingParams(seed=1234, top_p=0.95)

    def trajectory(batch_size: int, position: int) -> list[int]:
        generators = [make_generator(1234, "cpu") if i == position else
                      (make_generator(99 + i, "cpu") if i % 2 else None) for i in range(batch_size)]
        params = [seeded if i == position else SamplingParams(temperature=0.9, top_k=50) for i in range(batch_size)]
        ids = []
        for s in range(steps):
            batch = torch.randn(batch_size, vocab)
            batch[position] = logits[s]
            ids.append(run(batch, params, generators=generators).token_ids[position])
        return ids

    alone = trajectory(1, 0)
    assert trajectory(5, 3) == alone
    assert trajectory(4, 0) == alone
    assert len(set(alone)) > 1
    assert trajectory(1, 0) == alone
    different_seed = [make_generator(4321, "cpu")]
    other = [run(logits[s:s + 1], [seeded], generators=different_seed).token_ids[0] for s in range(steps)]
    assert other != alone


def test_logprobs_are_raw_and_top_logprobs_sorted():
    torch.manual_seed(3)
    logits = torch.randn(3, 50, dtype=torch.float16)
    params = [SamplingParams(logprobs=True, top_logprobs=5, temperature=0.3, repetition_penalty=1.5, top_k=4),
              SamplingParams(),
              SamplingParams(logprobs=True, top_logprobs=20, temperature=0.0)]
    out = run(logits, params, outputs=[[1, 2], [], [3]])
    raw = logits.float().log_softmax(-1)
    for row, token in enumerate(out.token_ids):
        assert out.logprobs[row] == pytest.approx(raw[row, token].item(), abs=1e-6)
    assert [len(top) for top in out.top_logprobs] == [5, 0, 20]
    for row, top in enumerate(out.top_logprobs):
        values = [lp for _, lp in top]
        assert values == sorted(values, reverse=True)
        best = raw[row].topk(len(top))
        assert [i for i, _ in top] == best.indices.tolist()
        assert values == pytest.approx(best.values.tolist(), abs=1e-6)
    assert run(logits, [SamplingParams()] * 3).logprobs is None


def test_one_host_transfer_per_step(monkeypatch):
    calls = []
    for name in ("tolist", "item", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            calls.append(_name)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    params = [SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3),
              SamplingParams(seed=5, top_k=3, top_p=0.9, min_p=0.05, repetition_penalty=1.2, frequency_penalty=0.1,
                             min_tokens=4),
              SamplingParams()]
    run(torch.randn(3, 32), params, outputs=[[1], [2, 3], []], prompts=[[4], [5], [6]],
        generators=[None, make_generator(5, "cpu"), None], stop_ids=[{0}, {0}, {0}])
    assert calls == ["tolist"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_syncs_once():
    device = torch.device("cuda")
    params = [SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3),
              SamplingParams(seed=5, top_k=3, top_p=0.9, min_p=0.05, repetition_penalty=1.2, frequency_penalty=0.1,
                             min_tokens=4),
              SamplingParams()]
    logits = torch.randn(3, 32000, device=device, dtype=torch.bfloat16)
    generators = [None, make_generator(5, device), None]
    args = (logits, params, [[1], [2, 3], []], [[4], [5], [6]], generators, [{0}, {0}, {0}])
    Sampler()(*args)    # warm-up: first pinned allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = Sampler()(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    assert out.token_ids[0] == logits[0].float().argmax().item()
    # Seeded rows give the same draws on the device whatever the batch.
    alone = Sampler()(logits[1:2], params[1:2], [[2, 3]], [[5]], [make_generator(5, device)], [{0}])
    again = Sampler()(*args[:4], [None, make_generator(5, device), None], args[5])
    assert alone.token_ids[0] == again.token_ids[1]


def test_precomputed_argmax_only_for_plain_greedy_batches():
    """A given argmax (the decode graph's) is the answer for an all-greedy batch without penalties, bans or
    logprobs; any of those makes the sampler compute from the logits as usual."""
    logits = torch.randn(2, 50)
    fake = torch.tensor([7, 9])                        # deliberately not the logits' argmax
    sampler = Sampler()

    def run(params, outs=([], [])):
        return sampler(logits, params, list(outs), [[1], [2]], [None, None], argmax=fake).token_ids
    greedy = SamplingParams(temperature=0.0)
    assert run([greedy, greedy]) == [7, 9]
    true_argmax = logits.argmax(-1).tolist()
    for other in (SamplingParams(temperature=0.0, repetition_penalty=1.3),
                  SamplingParams(temperature=0.0, presence_penalty=0.5),
                  SamplingParams(temperature=0.0, logprobs=True),
                  SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5])):
        assert run([greedy, other])[0] == true_argmax[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampler_graphs_draw_from_the_eager_distribution():
    """The graph-captured sampler (over a real decode graph's logits buffer) gives greedy rows their argmax
    and draws the other rows from exactly the distribution the eager sampler builds (temperature, top_k,
    top_p, min_p), each replay with fresh noise; a batch with a seeded row is left to the eager sampler."""
    from harness import Harness
    from model_zoo import tiny_models

    from hybridserve.engine.cuda_graphs import DecodeGraphs
    from hybridserve.engine.sampler_graphs import SamplerGraphs

    model = tiny_models()["spartacus"](torch.device("cuda"), torch.float32)
    decode = DecodeGraphs(model, Harness(model, num_pages=16).pools.view, max_bs=4, max_blocks=4)
    decode.capture()
    graphs = SamplerGraphs(decode)
    graphs.capture()
    V = decode.outputs[4].shape[-1]
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.full((3, V), -20.0, device="cuda")          # ~20 likely tokens a row: few enough to count
    logits[:, :20] = torch.randn(3, 20, device="cuda", generator=g) * 1.5
    with torch.inference_mode():                     # as the decode graph's replay leaves them
        decode.outputs[4][:3].copy_(logits)
        decode.argmax[4][:3].copy_(logits.argmax(-1))
    for params in ([SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=5),   # graph "kp"
                    SamplingParams(temperature=1.3, top_p=0.8, min_p=0.02)],
                   [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.6),    # graph "p"
                    SamplingParams(temperature=1.3, min_p=0.05)]):
        t = SamplingTensors.build(params, [[]] * 3, [[]] * 3, None, V, "cuda")
        want = apply_truncation(apply_penalties_and_temperature(logits, t), t).softmax(-1)
        n = 8000
        counts = torch.zeros(3, V, device="cuda")
        for _ in range(n):
            ids = graphs.run(params)
            counts[torch.arange(3, device="cuda"), ids] += 1
        freq = counts / n
        assert freq[0, logits[0].argmax()].item() == 1.0
        for row in (1, 2):
            outside = freq[row][want[row] == 0].sum().item()            # never outside the truncated set
            tv = 0.5 * (freq[row] - want[row]).abs().sum().item()       # total variation
            assert outside == 0 and tv < 0.05, (params[row], outside, tv)
    seeded = [SamplingParams(temperature=0.7, seed=3)] * 3
    out = Sampler()(logits, seeded, [[]] * 3, [[]] * 3, [make_generator(3, "cuda")] * 3,
                    argmax=decode.argmax[4][:3], graphs=graphs)
    again = Sampler()(logits, seeded, [[]] * 3, [[]] * 3, [make_generator(3, "cuda")] * 3)
    assert out.token_ids == again.token_ids


@pytest.mark.parametrize("knobs", [dict(top_p=0.9), dict(top_k=7), dict(min_p=0.1), dict(top_k=40, top_p=0.5),
                                   dict(min_p=0.3, top_k=100, top_p=0.95), dict(min_p=0.05, top_k=3),
                                   dict(top_p=1e-6), dict()])
def test_truncation_floor_keeps_what_apply_truncation_keeps(knobs):
    """Keeping logits >= truncation_floor (the sampler graphs' one-threshold form) is apply_truncation's
    mask, per row, for every knob and their combinations (rows also mix knobs and neutral values)."""
    g = torch.Generator().manual_seed(len(str(knobs)))
    V = 500
    x = torch.randn(4, V, generator=g) * torch.tensor([[0.5], [2.0], [4.0], [1.0]])
    params = [SamplingParams(**knobs), SamplingParams(**knobs), SamplingParams(), SamplingParams(**knobs)]
    t = SamplingTensors.build(params, [[]] * 4, [[]] * 4, None, V, "cpu")
    want = torch.isfinite(apply_truncation(x, t))

    def col(v, neutral):
        return v.view(-1) if v is not None else torch.full((4,), neutral)
    floor = truncation_floor(x, col(t.min_p, 0.0), t.top_k if t.top_k is not None else torch.full((4,), V),
                             col(t.top_p, 1.0))
    assert torch.equal(x >= floor[:, None], want)
