"""The host side of a graphed decode step, on CPU: the block-table rows the engine keeps from step to step
(engine/cuda_graphs.py fill_block_tables) and the per-request rule for which rows sample on the device
(engine/sampler.py device_from), both of which the engine now works out once instead of every step."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from hybridserve.engine.cuda_graphs import fill_block_tables
from hybridserve.engine.request import SamplingParams
from hybridserve.engine.sampler import NEVER, device_from, on_device


def test_block_table_rows_match_every_step():
    """Requests join, grow page by page, finish and give their pages back in random order; each step's table
    must hold every row's pages and page 0 in each pad row, whatever the rows held before."""
    rng = random.Random(3)
    max_bs, cols, page = 16, 12, 4
    table = np.full((max_bs, cols), -1, dtype=np.int32)      # junk where nothing was written yet
    held = [None] * max_bs
    free = list(range(1, 400))
    running: list[dict] = []
    rewrites = rows = 0
    for step in range(600):
        while len(running) < max_bs and rng.random() < 0.3:         # admissions: a fresh page list each
            n = rng.randint(1, 3)
            running.append({"pages": [free.pop() for _ in range(n)], "tokens": n * page - rng.randint(0, 3)})
        for r in list(running):
            if rng.random() < 0.04 or len(r["pages"]) == cols:      # finished: pages back, list dropped
                free.extend(r["pages"])
                r["pages"] = []
                running.remove(r)
        if not running:
            continue
        if rng.random() < 0.1:
            rng.shuffle(running)                                    # rows may move between steps
        for r in running:                                           # one more token: a page when full
            if r["tokens"] >= len(r["pages"]) * page:
                r["pages"].append(free.pop())
            r["tokens"] += 1
        before = table.copy()
        B = len(running)
        bs = next(s for s in (1, 2, 4, 8, 12, 16) if s >= B)
        w = fill_block_tables(table, held, [r["pages"] for r in running], bs)
        rewrites += int((before[:B] != table[:B]).any(axis=1).sum())
        rows += B
        assert w == max(len(r["pages"]) for r in running)
        for i, r in enumerate(running):
            assert table[i, :len(r["pages"])].tolist() == r["pages"], f"step {step} row {i}"
        assert (table[B:bs, 0] == 0).all(), f"step {step}: pad rows must read page 0"
    # a row changes when it grows a page (1 step in 4), moves (1 step in 10) or holds another request
    assert rewrites < rows / 2, f"{rewrites} of {rows} rows rewritten: unchanged rows should be kept"


def _old_on_device(p: SamplingParams, n: int, graphs: bool) -> bool:
    """The rule as it read before it was kept per request."""
    plain = (p.repetition_penalty == 1.0 and not p.frequency_penalty and not p.presence_penalty
             and not p.logprobs and not p.top_logprobs and n >= p.min_tokens)
    return plain and (p.greedy or (graphs and p.seed is None))


@pytest.mark.parametrize("temperature,seed,penalty,logprobs,min_tokens", itertools.product(
    [0.0, 0.8], [None, 7], [None, "repetition", "frequency", "presence"], [None, "logprobs", "top"], [0, 3]))
def test_device_rule_per_request_matches_the_per_step_rule(temperature, seed, penalty, logprobs, min_tokens):
    knobs = {"repetition": dict(repetition_penalty=1.1), "frequency": dict(frequency_penalty=0.5),
             "presence": dict(presence_penalty=0.5), None: {}}[penalty]
    knobs |= {"logprobs": dict(logprobs=True), "top": dict(top_logprobs=2), None: {}}[logprobs]
    p = SamplingParams(temperature=temperature, seed=seed, min_tokens=min_tokens, **knobs)
    for n, graphs in itertools.product(range(6), [False, True]):
        want = _old_on_device(p, n, graphs)
        assert on_device(p, n, graphs) == want
        # the engine's form: outputs against the request's fixed threshold, graphs needed unless greedy
        assert (n >= device_from(p) and (p.greedy or graphs)) == want
    assert (device_from(p) == NEVER) == (penalty is not None or logprobs is not None
                                         or (temperature > 0 and seed is not None))
