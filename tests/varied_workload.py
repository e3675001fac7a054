"""A varied serving workload through an AsyncEngine, in phases: the step shapes a server meets (one prompt at a
time over a range of lengths, bursts of prompts at once, prompts within one KV page and of exactly 16 pages,
staggered arrivals with every sampling path). The JIT test and bench/jit_after_ready.py run it after the
start-up warm-up and count the kernel variants it compiles; the warm-up's own requests are different ones.
Every request must end with its tokens, and the pools must be empty after each phase."""
from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from hybridserve.engine.request import SamplingParams

KINDS = ("greedy", "sampled", "topk", "seeded", "penalties", "logprobs", "stop")


def sampling(kind: str, max_tokens: int, rng: random.Random) -> SamplingParams:
    base = dict(max_tokens=max_tokens, ignore_eos=True)
    return {
        "greedy": lambda: SamplingParams(temperature=0.0, **base),
        "sampled": lambda: SamplingParams(temperature=0.8, top_p=0.95, **base),
        "topk": lambda: SamplingParams(temperature=0.7, top_k=40, min_p=0.05, **base),
        "seeded": lambda: SamplingParams(temperature=0.9, seed=rng.randrange(1000), **base),
        "penalties": lambda: SamplingParams(temperature=1.0, presence_penalty=0.4, frequency_penalty=0.2,
                                            repetition_penalty=1.1, **base),
        "logprobs": lambda: SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5, **base),
        "stop": lambda: SamplingParams(temperature=0.0, stop=["e", "the"], **base),
    }[kind]()


async def run(ae, *, seed: int = 7, lengths: tuple[int, ...] = (1, 2, 5, 16, 33, 100, 129, 255, 257, 511, 513,
                                                                  1000, 1025, 2047, 2049, 3000),
              bursts: tuple[int, ...] = (2, 3, 5, 8, 13, 16, 32, 64), staggered: int = 40,
              served: tuple[int, ...] = (8, 32),
              phase_done: Callable[[str], Awaitable[None] | None] | None = None) -> None:
    """Run the phases on a started AsyncEngine; `phase_done(name)` after each (its pools already checked)."""
    rng = random.Random(seed)
    vocab = min(ae.engine.model.config.vocab_size, 49152)
    top = ae.max_model_len - 48
    count = [0]

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(max(1, min(n, top)))]

    async def one(ids: list[int], params: SamplingParams, delay: float = 0.0) -> None:
        await asyncio.sleep(delay)
        count[0] += 1
        got = 0
        async for out in ae.generate(f"w{count[0]}", ids, params):
            assert out.error is None, out.error
            got += len(out.new_token_ids)
        assert got == params.max_tokens or (params.stop and got >= 1), (got, params)

    async def phase(name: str, coros, one_at_a_time: bool = False) -> None:
        if one_at_a_time:
            for c in coros:
                await c
        else:
            await asyncio.gather(*coros)
        # a request a stop string ended is released by the engine core once the abort the front side posted
        # reaches it (engine/text_streams.py): a turn or two after its stream ended
        for _ in range(250):
            s = ae.stats()
            if s.num_running == s.num_waiting == s.kv_pages_used == 0:
                break
            await asyncio.sleep(0.02)
        assert s.num_running == s.num_waiting == s.kv_pages_used == 0, (name, s)
        assert all(g.used == 0 for g in s.state_groups.values()), (name, s)
        if phase_done is not None:
            done = phase_done(name)
            if done is not None:
                await done

    await phase("lengths", [one(prompt(n), sampling("greedy", 3, rng)) for n in lengths if n <= top],
                one_at_a_time=True)
    for c in bursts:
        await phase(f"burst{c}", [one(prompt(rng.randrange(1, 300)), sampling("greedy", 6, rng)) for _ in range(c)])
    # every prompt within one KV page; every step's longest page list 16 pages; 16 sequences in one step
    await phase("tiny5", [one(prompt(rng.randrange(1, 16)), sampling("greedy", 4, rng)) for _ in range(5)])
    await phase("pages16", [one(prompt(rng.randrange(241, 256)), sampling("greedy", 4, rng)) for _ in range(3)])
    await phase("tiny16", [one(prompt(rng.randrange(1, 16)), sampling("greedy", 4, rng)) for _ in range(16)])
    await phase("staggered", [one(prompt(rng.randrange(1, 800)), sampling(rng.choice(KINDS), rng.randrange(4, 40), rng),
                                  delay=0.001 * rng.randrange(0, 20) * i) for i in range(staggered)])
    for kind in ("greedy", "sampled"):
        for c in served:
            await phase(f"served_{kind}{c}", [one(prompt(128), sampling(kind, 32, rng)) for _ in range(c)])
