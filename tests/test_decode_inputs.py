"""The host side of a graphed decode step, on CPU: the block-table rows the engine keeps from step to step
(engine/cuda_graphs.py fill_block_tables) and the per-request rule for which rows sample on the device
(engine/sampler.py device_from), both of which the engine now works out once instead of every step."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from hybridserve.engine.cuda_graphs import fill_block_tables, fill_decode_rows
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


@pytest.mark.parametrize("uses_kv", [True, False])
def test_decode_rows_by_column_match_the_per_row_rule(uses_kv):
    """fill_decode_rows writes the decode graph's host inputs by column (the KV slots by numpy from the block
    table): over random steps of rows joining, growing, moving and leaving, each step's arrays must equal those
    the per-row rule gives (position, slot, KV slot pages[pos // page] * page + pos % page, length pos + 1), with
    zeros and one token of context in the pad rows, for an async step (previous-step rows) and a plain one."""
    rng = random.Random(5)
    max_bs, cols, page = 16, 10, 4
    a = {"i64": np.full((5, max_bs), -7, dtype=np.int64), "seq_lens": np.full(max_bs, -7, dtype=np.int32),
         "block_tables": np.full((max_bs, cols), -1, dtype=np.int32)}
    held = [None] * max_bs
    free = list(range(1, 500))
    running: list[dict] = []
    for step in range(400):
        while len(running) < max_bs and rng.random() < 0.3:
            pos = rng.randint(0, 3 * page)
            running.append({"pages": [free.pop() for _ in range(pos // page + 1)] if uses_kv else [], "pos": pos,
                            "slot": rng.randint(1, 50), "token": rng.randint(0, 999)})
        for r in list(running):
            if rng.random() < 0.05 or r["pos"] + 1 >= cols * page:          # finished, or at the table's end
                free.extend(r["pages"])
                running.remove(r)
        if not running:
            continue
        if rng.random() < 0.1:
            rng.shuffle(running)
        B = len(running)
        bs = next(s for s in (1, 2, 4, 8, 12, 16) if s >= B)
        async_step = rng.random() < 0.5
        prev = rng.sample(range(max_bs), B) if async_step else None
        w = fill_decode_rows(a, held, [r["pos"] for r in running], [r["slot"] for r in running],
                             [r["pages"] for r in running], page, bs, uses_kv, prev,
                             None if async_step else [r["token"] for r in running])
        i64, lens = a["i64"], a["seq_lens"]
        assert i64[1, :B].tolist() == [r["pos"] for r in running], f"step {step}"
        assert i64[2, :B].tolist() == [r["slot"] for r in running]
        assert lens[:B].tolist() == [r["pos"] + 1 for r in running]
        assert i64[3, :B].tolist() == [r["pages"][r["pos"] // page] * page + r["pos"] % page if uses_kv else 0
                                       for r in running]
        if async_step:
            assert i64[4, :B].tolist() == prev
        else:
            assert i64[0, :B].tolist() == [r["token"] for r in running]
        assert (i64[:, B:bs] == 0).all() and (lens[B:bs] == 1).all(), f"step {step}: pad rows"
        assert w == (max(len(r["pages"]) for r in running) if uses_kv else 1)
        for r in running:                      # the step ran: one more token each, a page where it is full
            r["pos"] += 1
            if uses_kv and r["pos"] >= len(r["pages"]) * page:
                r["pages"].append(free.pop())
            r["token"] = rng.randint(0, 999)


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
