"""Text made on the front side of the engine core (engine/text_streams.py) and the core's column outputs
(engine/step_rows.py), over a real tiny model and the real SmolLM2 tokenizer: the same text, finish and counts as
the engine core's own detokenizer, a stop string found on the front side ends the request in the core too (its
pages return), and the columns survive the wire and the split between API processes."""
from __future__ import annotations

import asyncio
import pickle

import pytest

from hybridserve.engine.async_engine import AsyncEngine
from hybridserve.engine.build import build_llm_engine
from hybridserve.engine.request import FinishReason, RequestOutput, SamplingParams
from hybridserve.engine.step_rows import StepRows

from tiny import engine_config, prompt_ids, synth, wait_until


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = synth("llama", tmp_path_factory.mktemp("synth"))
    engine, name = build_llm_engine(engine_config(model, max_num_seqs=4))
    return engine, name


def core_outputs(engine, prompt: list[int], params: SamplingParams) -> list[RequestOutput]:
    """The request run on the engine core alone, which detokenizes itself."""
    engine.detokenize = True
    engine.add_request("direct", prompt, params)
    outs = []
    while engine.has_work():
        outs += engine.step()
    return outs


async def front_outputs(engine, name: str, prompt: list[int], params: SamplingParams) -> list[RequestOutput]:
    eng = AsyncEngine(engine, name)
    await eng.start(warm_up=False)
    try:
        outs = [o async for o in eng.generate("front", prompt, params)]
        await wait_until(lambda: eng.stats().num_running == 0 and eng.stats().kv_pages_used == 0)
        assert not engine.seqs
        return outs
    finally:
        await eng.shutdown()


def test_front_text_matches_the_core(built):
    engine, name = built
    prompt = prompt_ids(12, 3)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    direct = core_outputs(engine, prompt, params)
    full = "".join(o.new_text for o in direct)
    assert len(full) > 20 and direct[-1].finish_reason is FinishReason.LENGTH

    front = asyncio.run(front_outputs(engine, name, prompt, params))
    assert not engine.detokenize     # behind AsyncEngine the core hands out tokens only
    assert "".join(o.new_text for o in front) == full
    assert [t for o in front for t in o.new_token_ids] == [t for o in direct for t in o.new_token_ids]
    last = front[-1]
    assert last.finished and last.finish_reason is FinishReason.LENGTH and last.num_output_tokens == 40
    assert last.num_prompt_tokens == 12 and last.state_bytes == direct[-1].state_bytes
    assert last.kv_bytes == direct[-1].kv_bytes > 0


def test_stop_string_found_on_the_front_ends_the_request_in_the_core(built):
    engine, name = built
    prompt = prompt_ids(12, 5)
    full_params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    full = "".join(o.new_text for o in core_outputs(engine, prompt, full_params))
    stop = full[len(full) // 2:len(full) // 2 + 3]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
    direct = core_outputs(engine, prompt, params)
    assert direct[-1].finish_reason is FinishReason.STOP and direct[-1].stop_reason == stop

    front = asyncio.run(front_outputs(engine, name, prompt, params))   # checks the core let the request go
    text = "".join(o.new_text for o in front)
    assert text == "".join(o.new_text for o in direct) == full[:full.find(stop)]
    last = front[-1]
    assert last.finish_reason is FinishReason.STOP and last.stop_reason == stop
    assert last.num_output_tokens == direct[-1].num_output_tokens < 40
    assert sum(len(o.new_token_ids) for o in front) == last.num_output_tokens


def test_step_rows_wire_and_split():
    rows = StepRows()
    rows.add("a", 5, 1, 10, 1)
    rows.add("b", 6, 3, 12, 2)
    rows.others.append(RequestOutput("c", [7], "", True, FinishReason.LENGTH, None, [], 4, 9, 100, 200))
    back = StepRows.from_wire(pickle.loads(pickle.dumps(rows.to_wire())))
    assert list(back.plain()) == [("a", 5, 1, 10, 1), ("b", 6, 3, 12, 2)]
    assert back.others == rows.others and len(back) == 3
    outs = back.outputs(100, 50)
    assert [(o.request_id, o.new_token_ids, o.num_output_tokens, o.kv_bytes) for o in outs] == [
        ("a", [5], 1, 50), ("b", [6], 3, 100), ("c", [7], 9, 200)]
    owners = {"a": 0, "b": 1, "c": 1}
    seen = []

    def owner_of(rid, finished):
        seen.append((rid, finished))
        return owners.get(rid)
    parts = rows.split_others(owner_of)
    assert list(parts) == [1] and parts[1][0].request_id == "c" and seen == [("c", True)]
    assert StepRows().split_others(owner_of) == {}
    # several API processes: the columns pickled once for all, each process's own other outputs
    columns = pickle.dumps(rows.columns())
    mine = StepRows.from_wire(pickle.loads(pickle.dumps(StepRows(others=parts[1]).to_wire(columns))))
    assert list(mine.plain()) == list(rows.plain()) and mine.others == rows.others
