"""After the start-up warm-up, serving compiles no Triton kernel (GPU only).

A kernel variant first met after ready compiles inside somebody's request: 0.1-1 s apiece on a machine whose
Triton cache is empty, seconds for a burst. Per architecture (tiny checkpoints, bf16 as served, CUDA graphs
and async scheduling on), the engine starts with its default warm-up (`shapes` on CUDA), then runs
tests/varied_workload.py (different requests from the warm-up's: other lengths, bursts up to 16 sequences,
one-page and 16-page prompts, staggered arrivals over every sampling path). Every Triton compile is recorded
(kernels/jit_watch.py, the same record behind `hybridserve:jit_compiles_after_ready_total`); none may come
after ready. The count is in-process, so a warm on-disk Triton cache does not hide a missed variant."""
from __future__ import annotations

import asyncio

import pytest
import torch

from hybridserve.engine.async_engine import AsyncEngine
from hybridserve.engine.build import build_llm_engine
from hybridserve.engine.config import EngineConfig
from hybridserve.kernels import jit_watch
from hybridserve.weights.synth import GENERATORS, write_synthetic

import varied_workload
from tiny import tokenizer_source

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tokenizer = tokenizer_source()
    root = tmp_path_factory.mktemp("jit")
    return {a: write_synthetic(a, "tiny", root / a, seed=3, tokenizer_from=tokenizer) for a in GENERATORS}


@pytest.mark.skipif(not jit_watch.available(), reason="this Triton has no compile hooks")
@pytest.mark.parametrize("arch", sorted(GENERATORS))
def test_no_kernel_compiles_after_ready(checkpoints, arch):
    jit_watch.forget_compiled()   # as a fresh process: the other architectures' variants do not count
    engine, name = build_llm_engine(EngineConfig(
        model=str(checkpoints[arch]), device="cuda", dtype="bfloat16", max_num_seqs=16, max_model_len=1024,
        max_num_batched_tokens=512, kv_cache_memory=256 << 20))
    ae = AsyncEngine(engine, name)
    assert ae.warmup_mode == "shapes"

    async def run():
        await ae.start()
        try:
            before = ae.core.jit_compiles
            await varied_workload.run(ae, seed=11, lengths=(1, 3, 17, 64, 150, 511, 513, 900), bursts=(2, 5, 16),
                                      staggered=24, served=(8,))
            late = ae.core.compiles_since(before)
        finally:
            await ae.shutdown()
        return late

    late = asyncio.run(run())
    assert not late, "compiled after ready:\n" + "\n".join(f"{c.kernel} {c.variant}" for c in late)
    assert ae.jit_compiles_after_ready == 0
