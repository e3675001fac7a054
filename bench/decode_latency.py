"""GPU decode latency, context flatness and prefill time of full-size synthetic checkpoints, against the
memory-bandwidth / FLOP floor and a plain-PyTorch baseline measured in the same run.

- floor: bytes a decode step must move (weights once + each request's state read and written + the KV it
  reads) over the copy bandwidth measured here; prefill: 2 * params * tokens over the measured bf16
  matmul rate.
- ours: the engine's CUDA-graph decode step (Triton kernels, in-place slots, inputs through the pinned
  mirrors, one replay per step), timed back to back as the engine runs it with async scheduling
  (`ms_per_step`). Until the ninth session each step was waited for and its inputs copied from a BatchMeta
  (~8 device copies), which added the host's launches to every step: `ms_per_step_each_waited` is that.
  `ms_per_step_replay_only`: the replay alone, back to back, its inputs not brought in (the lower bound of the
  input path).
- baseline: the same model, eager PyTorch with the reference kernels (per-op launches, no graph).

Usage (on the GPU machine): python bench/decode_latency.py [--archs spartacus,...] [--batches 1,8,...]
Writes $OUT/decode_latency.json (or bench/results/decode_latency.json).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from hybridserve.engine.cache_pools import CachePools, MemoryPlan
from hybridserve.engine.config import EngineConfig
from hybridserve.engine import cuda_graphs
from hybridserve.engine.cuda_graphs import DecodeGraphs, PrefillGraphs, prefill_buckets
from hybridserve.engine.model_runner import SeqChunk, build_meta
from hybridserve.kernels import attn_res_triton
from hybridserve.kernels import attention_o_triton as aot
from hybridserve.kernels import fused_triton as ft
from hybridserve.kernels import l2_prefetch as l2p
from hybridserve.kernels import monoid_triton as mt
from hybridserve.kernels import neollm_ops_triton
from hybridserve.kernels import paged_attention_triton as pat
from hybridserve.kernels import pdl
from hybridserve.kernels import sampling_triton
from hybridserve.kernels import state_token_triton
from hybridserve.models import layers, llama, nanohammer, spartacus
from hybridserve.models.registry import build_model
from hybridserve.weights.checkpoint import Checkpoint
from hybridserve.weights.synth import GENERATORS

PAGE = 16
CHUNK = EngineConfig().max_num_batched_tokens      # the engine's prefill chunk


def measure_copy_bandwidth() -> float:
    """Bytes read + written per second for a large device-to-device copy."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = 20
    for _ in range(n):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * n / (time.perf_counter() - t)


def measure_sm_clock_hz(cycles: int = 20_000_000) -> float:
    """The SM clock the GPU runs a spinning kernel at (torch.cuda._sleep spins for `cycles` clock cycles): machines
    of one kind have differed in it, and a batch-1 step's latency-bound part scales with it, while the copy
    bandwidth (the floor) does not."""
    torch.cuda._sleep(cycles)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) * 1e-3)


def nvidia_smi_clocks() -> dict:
    """The clocks and limits nvidia-smi reports (empty where it is not installed)."""
    fields = "clocks.sm,clocks.max.sm,clocks.applications.graphics,clocks.mem,clocks.max.mem,power.limit"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits", "-i",
                              str(torch.cuda.current_device())], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(zip(fields.split(","), (v.strip() for v in out.strip().split(",")))) if out.strip() else {}


def measure_matmul_rate() -> float:
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        x @ y
    torch.cuda.synchronize()
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - t)


def load_full(arch: str):
    """`arch` or `arch:size` (a synthetic size other than the default full one, e.g. kotodama:3b)."""
    arch, _, size = arch.partition(":")
    mod, fn = GENERATORS[arch].split(":")
    torch.manual_seed(0)
    config, tensors = getattr(importlib.import_module(mod), fn)(size or "full", 0)
    ckpt = Checkpoint(arch=arch, config=config, tensors=tensors, source=f"synth:{arch}:full")
    model = build_model(ckpt, torch.bfloat16, torch.device("cuda"))
    del tensors, ckpt
    return model


def time_fn(fn, iters: int = 200, warmup: int = 50) -> float:
    """Median of `iters` timed calls after `warmup` untimed ones (the GPU ramps its clocks meanwhile)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def time_steps(fn, iters: int = 200, warmup: int = 50) -> float:
    """ms per call of `iters` calls launched back to back (one pair of events around them all), as the engine
    runs decode steps with async scheduling: each launched before the last has finished, so the GPU does not
    wait for the host between steps (time_fn waits for each call, so it adds the host's launch to each)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def step_weight_bytes(model) -> int:
    """Weight bytes a decode step reads: every weight once, except an untied input embedding table, of
    which a step reads one row per token (NanoHammer's 525 MB at full size; a tied table is the LM head
    and is read whole). The floor's numerator, with the requests' state and KV bytes."""
    n = model.weights_bytes()
    if model.embed is not model.lm_head:
        n -= model.embed.numel() * model.embed.element_size()
    return n


def floor_ms(model, s: "Setup", bw: float) -> float:
    """The Setup's decode floor: the weight bytes a step reads, each request's state read and written and its
    KV read, over the copy bandwidth `bw`."""
    return 1e3 * (step_weight_bytes(model) + s.batch * (2 * s.state_bytes + s.kv_read)) / bw


class Setup:
    """B requests, each with `context` tokens already in its KV pages / state slot (random contents:
    decode time does not depend on the values), ready for one decode step."""

    def __init__(self, model, batch: int, context: int):
        layout = model.cache_layout()
        pages_per_seq = -(-(context + 1) // PAGE)
        plan = MemoryPlan(batch * pages_per_seq + 1 if layout.kv else 1, batch if layout.states else 0, batch,
                          layout.kv_bytes_per_token(model.dtype) * PAGE, layout.state_bytes_per_slot(model.dtype))
        self.pools = CachePools(layout, plan, PAGE, model.dtype, model.device)
        for k, v in self.pools.view.kv:
            k.normal_(0, 1)
            v.normal_(0, 1)
        for t in self.pools.view.states.values():
            t.normal_(0, 0.1)
        chunks = []
        for b in range(batch):
            pages = self.pools.pages.allocate(pages_per_seq) if layout.kv else []
            slot = self.pools.slots.allocate() if layout.states else 0
            if layout.states:
                for t in self.pools.view.states.values():
                    t[:, slot].normal_(0, 0.1)
            chunks.append(SeqChunk([b % 1000 + 1], context, pages, slot, True))
        self.batch, self.chunks = batch, chunks
        self.meta = build_meta(chunks, PAGE, model.device)
        self.pages_per_seq = pages_per_seq
        self.state_bytes = sum(plan.state_slot_bytes.values())
        self.kv_read = layout.kv_bytes_per_token(model.dtype) * (context + 1)


def set_pdl(on: bool) -> None:
    os.environ["HYBRIDSERVE_PDL"] = "1" if on else "0"
    pdl._supported.cache_clear()


# The decode graph's block-table width: the model's context (False, as the engine captures it), or the
# Setup's own pages (True: fewer attention splits, the split count coming from the table's width), or at least
# that many pages (an int)
NARROW_TABLE: bool | int = False


def graph_step(model, s: Setup, B: int):
    """The Setup's decode step captured as a CUDA graph (as the engine runs it: a block table as wide as
    the model's context, which sets the attention's split count): a function running it as the engine does,
    inputs through the pinned host mirrors (three copies), then the replay."""
    full = -(-model.max_model_len // PAGE)
    width = (min(max(s.pages_per_seq, int(NARROW_TABLE)), full) if NARROW_TABLE else max(s.pages_per_seq, full))
    graphs = DecodeGraphs(model, s.pools.view, B, width, sizes=[B])
    graphs.capture()

    def step():
        return graphs.run_chunks(s.chunks, PAGE)
    step.from_meta = lambda: graphs.run(s.meta)      # the earlier sessions' input path (~8 device copies)
    step.replay = graphs.graphs[graphs.padded_size(B)].replay    # the graph alone: no input copy before it
    return step


def graph_ms(model, s: Setup, B: int) -> float:
    """graph_step's ms per step, back to back (time_steps)."""
    return time_steps(graph_step(model, s, B))


def _knob(mod, attr):
    return lambda: getattr(mod, attr), lambda v: setattr(mod, attr, v)


def _knobs(*pairs):
    """Several knobs set together: getter and setter of the tuple of their values."""
    return (lambda: tuple(getattr(m, a) for m, a in pairs),
            lambda vs: [setattr(m, a, v) for (m, a), v in zip(pairs, vs)])


def _entry_waits_from(first: int):
    """NanoHammer's StateEntries.take with no wait for the layers before `first` (a timing probe)."""
    real = nanohammer.StateEntries.take

    def take(self, i):
        return self.kv[i] if i < first else real(self, i)

    return (lambda: nanohammer.StateEntries.take, lambda f: setattr(nanohammer.StateEntries, "take", f), take)


def _attn_o(per_sm=None, rows=None):
    """The attention sublayer through the o projection in one kernel (layers.ATTN_O), with its programs per SM
    and weight-tile rows (None: the defaults)."""
    return (*_knobs((layers, "ATTN_O"), (aot, "PROGRAMS_PER_SM"), (aot, "ROWS")),
            (True, per_sm or aot.PROGRAMS_PER_SM, rows or aot.ROWS))


def _merge_o(per_sm=None, rows=None):
    """The split merge and the o GEMV in one kernel (layers.ATTN_MERGE_O), with its programs per SM and
    weight-tile rows (None / 0: the defaults)."""
    return (*_knobs((layers, "ATTN_MERGE_O"), (aot, "MERGED_PER_SM"), (aot, "MERGED_ROWS")),
            (True, per_sm or aot.MERGED_PER_SM, rows or aot.MERGED_ROWS))


def _prefetch(programs=None, lines=False, early=False, extra=0):
    """The L2 prefetch during the attention (kernels/l2_prefetch.py) on, with these settings."""
    return (*_knobs((l2p, "PREFETCH"), (l2p, "PROGRAMS"), (l2p, "LINES"), (l2p, "EARLY"), (l2p, "EXTRA_BYTES")),
            (True, programs or l2p.PROGRAMS, lines, early, extra))


def _resident(release=True, rows=None, warps=None):
    """The o projection held in registers before the attention ends (fused_triton.RESIDENT_AFTER_BLOCK), the
    token mixer's kernels releasing the next launch before their waits (pdl.EARLY_MIXER) or not."""
    return (*_knobs((ft, "RESIDENT_AFTER_BLOCK"), (pdl, "EARLY_MIXER"), (ft, "RESIDENT_ROWS"), (ft, "RESIDENT_WARPS")),
            (True, release, rows or ft.RESIDENT_ROWS, warps or ft.RESIDENT_WARPS))


# A/B knobs: the same step with one setting changed (name: getter, setter, value); a knob already at its
# value (PDL unsupported, the GEMV already one-row) is not timed again
VARIANTS = {"pdl_off": (lambda: pdl.enabled(torch.device("cuda")), set_pdl, False),
            "pdl_early": (*_knob(pdl, "EARLY_RELEASE"), True),   # each kernel releases the next before its wait
            "pdl_early_mixer": (*_knob(pdl, "EARLY_MIXER"), True),  # ... only the token mixer's kernels
            "attn_o": _attn_o(), "attn_o_p1": _attn_o(per_sm=1), "attn_o_p4": _attn_o(per_sm=4),
            "attn_o_rows8": _attn_o(rows=8), "attn_o_rows32": _attn_o(rows=32),
            # the o projection's weight asked into L2 during the attention (kernels/l2_prefetch.py): 32 / 528
            # programs, bulk copies or a line per thread, issued before the wait
            "prefetch_on": _prefetch(),
            "resident_o": _resident(), "resident_o_late": _resident(release=False),
            "resident_o_r4w2": _resident(rows=4, warps=2), "resident_o_r16w8": _resident(rows=16, warps=8),
            "prefetch_p528": _prefetch(programs=528),
            "prefetch_lines_p528": _prefetch(programs=528, lines=True),
            "prefetch_early_p528": _prefetch(programs=528, early=True),
            # the GEMV before the attention / recurrence step with 3 or 2 programs per SM, all resident
            "before_block_3": (*_knob(ft, "BEFORE_BLOCK_PER_SM"), 3),
            "before_block_2": (*_knob(ft, "BEFORE_BLOCK_PER_SM"), 2),
            "gemv_nreg_free": (*_knob(ft, "GEMV_STREAM_MAXNREG"), None),   # the compiler's register count
            "gemv_nreg64": (*_knob(ft, "GEMV_STREAM_MAXNREG"), 64),
            # ... and the first 8 MB of the MLP's gate|up weight too (the Llama family)
            "prefetch_extra8m": _prefetch(extra=8 << 20),
            "gemv_one_row_only": (*_knob(ft, "GEMV_MAX_ROWS"), 1),      # cuBLAS/GEMM for 2+ rows
            "gemv_two_rows": (*_knob(ft, "GEMV_MAX_ROWS"), 2),          # the GEMV for 2-row matmuls too
            "gemv_rows_4": (*_knob(ft, "GEMV_MAX_ROWS"), 4),            # ... and up to 4 rows
            "gemv_rows_8": (*_knob(ft, "GEMV_MAX_ROWS"), 8),            # ... and up to 8 rows
            "gemv_narrow_off": (*_knob(ft, "GEMV_NARROW_ROWS"), 1),     # narrow models' 2-row matmuls on cuBLAS
            "mm_off": (*_knob(ft, "MM_MAX_ROWS"), 0),                     # cuBLAS for every multi-row matmul
            "min_split_256": (*_knob(pat, "MIN_SPLIT"), 256),             # attention splits of >= 256 keys
            "stream_off": (*_knob(ft, "GEMV_STREAM"), False),             # the plain GEMV at batch 1
            "step_kernel_on": (*_knob(spartacus, "STEP_KERNEL"), True),  # Spartacus batch 1: one persistent kernel
            "side_stream_off": (*_knob(nanohammer, "SIDE_STREAM"), False),  # NanoHammer's state entries in line
            "merge_fused": (*_knob(pat, "FUSED_MERGE"), True),            # attention splits merged by the last one
            "attn_one_kernel": (*_knob(layers, "ATTN_STEP_FUSED"), True),  # RoPE + KV write inside the attention
            # ... and the splits merged by the last of them
            "attn_one_kernel_merge": (*_knobs((layers, "ATTN_STEP_FUSED"), (pat, "FUSED_MERGE")), (True, True)),
            "entry_fold_off": (*_knob(nanohammer, "FOLD_ENTRY"), False),  # NanoHammer's entries unfolded
            # NanoHammer's state entry waited for at the layer's start (before the q|k|v GEMV), not at the attention
            "entry_wait_early": (*_knob(llama, "ENTRY_AT_ATTENTION"), False),
            # NanoHammer's token_to_state projection on cuBLAS (F.linear with its bias), not the side GEMV (no effect
            # while the token table is used: combine with state_table_off)
            "t2s_cublas": (*_knob(nanohammer, "TOKEN_TO_STATE_GEMV"), False),
            # NanoHammer's token_to_state as a projection again (the side GEMV), not a row of the token table
            "state_table_off": (*_knob(nanohammer, "TOKEN_STATE_TABLE"), False),
            # NanoHammer decode: the readout and each layer's fold GEMV as kernels of their own again
            "decode_chain_off": (*_knob(nanohammer, "DECODE_CHAIN"), False),
            # ... with each layer's fold GEMV in the cell kernels up to 16 rows (decode_latency_chain3-h100.json,
            # taken while 16 was the default, calls the present default `fold_cell_rows_1`)
            "fold_cell_rows_16": (*_knob(state_token_triton, "FOLD_IN_CELL_ROWS"), 16),
            # NanoHammer with the table: the side chain queued after the embedding gather
            "entries_after_gather": (*_knob(nanohammer, "ENTRIES_BEFORE_GATHER"), False),
            # NanoHammer's side stream with programmatic dependent launch, as the backbone
            "side_pdl": (*_knob(nanohammer, "SIDE_PLAIN"), False),
            # timing probes only, wrong results: layer 0 (or layers 0-1) reads its state entry without waiting for
            # the side stream to finish it, so the step shows what that wait costs
            "probe_no_entry0_wait": _entry_waits_from(1),
            "probe_no_entry01_wait": _entry_waits_from(2),
            # the decode graphs captured on a stream at the default (lowest) priority, as before
            "capture_priority_default": (*_knob(cuda_graphs, "CAPTURE_PRIORITY"), 0),
            # Spartacus batch 1: the recurrence inside the qkvz GEMV (its programs-per-head sweep is in
            # bench/results/decode_latency_projection-h100.json, taken when it was on by default)
            "projection_on": (*_knob(mt, "PROJECTION_FUSED"), True),
            "rope_in_gemv_on": (*_knob(ft, "ROPE_IN_GEMV"), True),   # batch 1: RoPE + KV write in the qkv GEMV
            "gather_torch": (*_knob(ft, "GATHER_KERNEL"), False),  # torch index kernels for embedding, cos/sin
            "head_unpadded": (*_knob(neollm_ops_triton, "PADDED_HEAD"), False),  # NeoLLM's head on its own rows
            "select_pdl_off": (*_knob(sampling_triton, "SELECT_PDL"), False),  # argmax kernels without PDL
            # the committed route sources before the PDL wait at one token row / at every row count
            "route_early": (*_knob(attn_res_triton, "COMMITTED_EARLY_ROWS"), 1),
            "route_early_all": (*_knob(attn_res_triton, "COMMITTED_EARLY_ROWS"), 1 << 20),
            **{f"route_w{w}": (*_knob(attn_res_triton, "WARPS"), w) for w in (4, 8, 32)},
            "table_narrow": (*_knob(sys.modules[__name__], "NARROW_TABLE"), True),  # the Setup's pages only
            **{f"table_{p}": (*_knob(sys.modules[__name__], "NARROW_TABLE"), p) for p in (16, 32, 64, 128)},
            "kv_early": (*_knob(pat, "KV_EARLY"), True),   # the attention's first k/v tile before its PDL wait
            "merge_o": _merge_o(),   # the split merge and the o GEMV in one kernel
            **{f"merge_o_p{p}" + (f"_r{r}" if r else ""): _merge_o(p, r)
               for p in (1, 2, 3, 4, 6, 8) for r in (0, 8, 32)},
            # the o projection with the general streamed-GEMV setting (fused_triton.AFTER_BLOCK_STREAM)
            "after_block_general": (*_knob(ft, "AFTER_BLOCK_STREAM"), None),
            # L2 eviction hints: the one-row GEMVs' weight loads evict-first (the default) or not, the
            # attention's k/v loads evict-last (both: "weight_evict_first&kv_evict_last", named "evict_both" in
            # results/decode_latency_evict*-h100.json)
            "weight_evict_first": (*_knob(ft, "WEIGHT_EVICT"), "evict_first"),
            "weight_evict_normal": (*_knob(ft, "WEIGHT_EVICT"), ""),
            "kv_evict_last": (*_knob(pat, "KV_EVICT"), "evict_last"),
            "idle_wait": (*_knob(pat, "IDLE_EXIT"), False),   # attention splits with no keys wait all the same
            "target_1024": (*_knob(pat, "TARGET_PROGRAMS"), 1024),   # attention grids of 1024 programs, not a wave
            # the step's ends as before: torch index kernels for the embedding and cos/sin, argmax without PDL
            "step_ends_torch": (lambda: (ft.GATHER_KERNEL, sampling_triton.SELECT_PDL),
                                lambda v: (setattr(ft, "GATHER_KERNEL", v[0]),
                                           setattr(sampling_triton, "SELECT_PDL", v[1])), (False, False))}
PDL_COMPARE = ("pdl_off", "gemv_one_row_only")


def _stream_shape(name: str):
    """A variant "stream:NxKxS=BN/BK/W/P/R": the streamed GEMV of [N, K] weights (S stacked) with that setting
    (fused_triton.GEMV_STREAM_SHAPES); several shapes joined by "+"."""
    settings = {}
    for part in name.split(":", 1)[1].split("+"):
        shape, cfg = part.split("=")
        N, K, S = (int(v) for v in shape.split("x"))
        BN, BK, W, P, R = (int(v) for v in cfg.split("/"))
        settings[(N, K, S)] = (BN, BK, W, P, bool(R))
    return (lambda: ft.GEMV_STREAM_SHAPES, lambda v: setattr(ft, "GEMV_STREAM_SHAPES", v),
            {**ft.GEMV_STREAM_SHAPES, **settings})


def variant_knob(name: str):
    """(getter, setter, value) of a variant: a VARIANTS name or a "stream:" setting, or several of them
    joined by "&" (all set together)."""
    if "&" in name:
        knobs = [variant_knob(part) for part in name.split("&")]
        return (lambda: tuple(get() for get, _, _ in knobs),
                lambda vs: [put(v) for (_, put, _), v in zip(knobs, vs)],
                tuple(value for _, _, value in knobs))
    return _stream_shape(name) if name.startswith("stream:") else VARIANTS[name]


def variant_step(model, s: Setup, B: int, name: str):
    """graph_step captured with the variant's knob set (None when the knob already has that value)."""
    get, put, value = variant_knob(name)
    before = get()
    if before == value:
        return None
    put(value)
    try:
        return graph_step(model, s, B)
    finally:
        put(before)


def interleaved_ms(steps: dict, rounds: int, timer=time_steps) -> dict[str, list[float]]:
    """Each captured step timed `rounds` times in turn (A B C A B C ...), so clock and thermal drift over
    the run reach every variant alike: {name: [ms of each round]}."""
    runs = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            runs[name].append(timer(fn))
    return runs


def decode_rows(model, arch, batches, bw, baseline_max_batch, pdl_batches=(), variants=(), variant_batches=(),
                rounds=1, context=128):
    """ms per decode step at each batch (each row's context `context`) against the floor; the variants'
    steps captured beside the default one and all timed in turn, `rounds` times (the medians of the rounds'
    medians)."""
    rows = []
    weights = step_weight_bytes(model)
    for B in batches:
        s = Setup(model, B, context)
        steps = {"": graph_step(model, s, B)}
        steps["replay_only"] = steps[""].replay
        for name in (PDL_COMPARE if B in pdl_batches else ()) + tuple(variants if B in variant_batches else ()):
            step = variant_step(model, s, B, name)
            if step is not None:
                steps[name] = step
        runs = interleaved_ms(steps, rounds)
        med = {name: sorted(r)[len(r) // 2] for name, r in runs.items()}
        ms = med.pop("")
        synced = sorted(interleaved_ms({"": steps[""].from_meta}, rounds, time_fn)[""])[rounds // 2]
        floor = floor_ms(model, s, bw)
        row = {"arch": arch, "batch": B, "context": context, "ms_per_step": ms, "ms_per_step_each_waited": synced,
               "tok_per_s": 1e3 * B / ms,
               "floor_ms": floor, "ratio_to_floor": ms / floor, "weights_bytes": model.weights_bytes(),
               "step_weight_bytes": weights,
               "state_bytes_per_request": s.state_bytes, "pdl": pdl.enabled(model.device)}
        row.update({f"ms_per_step_{name}": t for name, t in med.items()})
        if rounds > 1:
            row["rounds"] = {name or "default": r for name, r in runs.items()}
        del steps
        if B <= baseline_max_batch:
            os.environ["HYBRIDSERVE_KERNELS"] = "reference"
            try:
                with torch.inference_mode():
                    base = time_fn(lambda: model.forward(s.meta, s.pools.view), iters=10, warmup=3)
            finally:
                os.environ.pop("HYBRIDSERVE_KERNELS")
            row["baseline_eager_reference_ms"] = base
            row["speedup_vs_baseline"] = base / ms
        rows.append(row)
        print(f"{arch:11} B={B:4} ctx={context:6} {ms:8.3f} ms  floor {floor:7.3f} ms  x{ms / floor:5.2f}  "
              f"{row['tok_per_s']:9.0f} tok/s" + (f"  baseline {row['baseline_eager_reference_ms']:8.2f} ms"
                                                  if "baseline_eager_reference_ms" in row else "")
              + "".join(f"  {k[12:]} {v:.3f} ms" for k, v in row.items() if k.startswith("ms_per_step_")),
              flush=True)
        torch.cuda.empty_cache()
    return rows


def flatness_rows(model, arch, contexts, bw):
    rows = []
    for ctx in [c for c in contexts if c < model.max_model_len]:   # the engine admits no longer context
        s = Setup(model, 1, ctx)
        ms, floor = graph_ms(model, s, 1), floor_ms(model, s, bw)
        rows.append({"arch": arch, "context": ctx, "ms_per_step": ms, "floor_ms": floor})
        print(f"{arch:11} ctx={ctx:6} {ms:8.3f} ms  floor {floor:7.3f} ms", flush=True)
        torch.cuda.empty_cache()
    if not rows:
        return rows
    base = rows[0]["ms_per_step"]
    for r in rows:
        r["ratio_to_shortest"] = r["ms_per_step"] / base
    return rows


def prefill_rows(model, arch, lengths, flops):
    rows = []
    params = step_weight_bytes(model) // 2      # matmul weights (an untied embedding is a lookup)
    for n in lengths:
        s = Setup(model, 1, n)             # a pool with pages for the n prompt tokens, all owned by the request
        slot = s.meta.slot_ids.tolist()[0]
        all_pages = s.meta.block_tables[0, :s.pages_per_seq].tolist() if s.pools.layout.kv else []
        ids = [(7 * i) % 30000 + 1 for i in range(n)]
        meta = build_meta([SeqChunk(ids, 0, all_pages, slot, True)], PAGE, model.device)

        def run():
            with torch.inference_mode():
                model.forward(meta, s.pools.view)
        ms = time_fn(run, iters=5, warmup=5)
        floor_ms = 1e3 * 2 * params * n / flops
        row = {"arch": arch, "prompt_tokens": n, "ttft_ms_eager": ms, "flop_floor_ms": floor_ms}
        # what the engine runs for a lone prompt: chunks of CHUNK tokens, each its bucket's graph
        pieces = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
        buckets = [next((b for b in prefill_buckets(CHUNK) if b > hi - lo), None) for lo, hi in pieces]
        if all(buckets):
            steps = [[SeqChunk(ids[lo:hi], lo, all_pages, slot, hi == n)] for lo, hi in pieces]
            graphs = PrefillGraphs(model, s.pools.view, meta.block_tables.shape[1], buckets=tuple(set(buckets)))
            graphs.capture()
            row["ttft_ms_graph"] = time_fn(lambda: [graphs.run(c, b) for c, b in zip(steps, buckets)],
                                           iters=20, warmup=5)
            row["graph_bucket"] = buckets[-1]
            row["graph_chunks"] = len(pieces)
            del graphs
        row["ttft_ms"] = min(ms, row.get("ttft_ms_graph", ms))
        row["ratio_to_floor"] = row["ttft_ms"] / floor_ms
        rows.append(row)
        print(f"{arch:11} prefill {n:6} tokens {row['ttft_ms']:8.2f} ms  floor {floor_ms:7.2f} ms  eager {ms:8.2f}"
              + (f"  graph ({row['graph_chunks']} x bucket {row['graph_bucket']}) {row['ttft_ms_graph']:.2f} ms"
                 if "ttft_ms_graph" in row else ""),
              flush=True)
        torch.cuda.empty_cache()
    return rows


def kernel_breakdown(model, arch, batch=1):
    """Where one eager decode step's GPU time goes, by kernel (top 12)."""
    s = Setup(model, batch, 128)
    with torch.inference_mode():
        for _ in range(3):
            model.forward(s.meta, s.pools.view)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                model.forward(s.meta, s.pools.view)
            torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if e.device_time_total > 0]
    ev.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in ev) / 5
    out = {"arch": arch, "batch": batch, "gpu_us_per_step": total,
           "kernels": [{"name": e.key[:80], "us_per_step": e.device_time_total / 5, "calls_per_step": e.count / 5}
                       for e in ev[:12]]}
    print(f"{arch} B={batch}: {total:.0f} us of GPU work per eager step; top: "
          + ", ".join(f"{k['name'][:40]} {k['us_per_step']:.0f}us" for k in out["kernels"][:4]), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="spartacus,nanohammer,kotodama,neollm")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--contexts", default="1024,8192,32768,65536")
    ap.add_argument("--prefill", default="16,128,500,1024,4096,8192")
    ap.add_argument("--baseline-max-batch", type=int, default=8)
    ap.add_argument("--pdl-compare", default="1", help="batches also timed with PDL off")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: decode,flat,prefill,profile")
    ap.add_argument("--variants", default="", help=f"A/B knobs, comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--variant-batches", default="1", help="batches also timed with each variant")
    ap.add_argument("--decode-context", type=int, default=128, help="each row's context in the decode part")
    ap.add_argument("--rounds", type=int, default=1, help="decode steps timed this many times in turn")
    ap.add_argument("--profile-batches", default="1", help="batch sizes of the per-kernel breakdown")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    bw, flops = measure_copy_bandwidth(), measure_matmul_rate()
    clock = measure_sm_clock_hz()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s, "
          f"SM clock {clock / 1e6:.0f} MHz", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": importlib.import_module("triton").__version__, "copy_bandwidth_Bps": bw,
              "matmul_flops": flops, "sm_clock_hz": clock, "nvidia_smi": nvidia_smi_clocks(),
              "decode": [], "flatness": [], "prefill": [], "profile": []}
    for arch in args.archs.split(","):
        t = time.perf_counter()
        model = load_full(arch)
        print(f"{arch}: built in {time.perf_counter() - t:.1f}s, weights {model.weights_bytes() / 1e9:.2f} GB",
              flush=True)
        if "decode" not in skip:
            result["decode"] += decode_rows(model, arch, [int(b) for b in args.batches.split(",")], bw,
                                            args.baseline_max_batch,
                                            [int(b) for b in args.pdl_compare.split(",") if b],
                                            [v for v in args.variants.split(",") if v],
                                            [int(b) for b in args.variant_batches.split(",") if b], args.rounds,
                                            args.decode_context)
        if "flat" not in skip and arch in ("spartacus", "nanohammer", "neollm"):
            result["flatness"] += flatness_rows(model, arch, [int(c) for c in args.contexts.split(",")], bw)
        if "prefill" not in skip:
            result["prefill"] += prefill_rows(model, arch, [int(n) for n in args.prefill.split(",")], flops)
        if "profile" not in skip:
            result["profile"] += [kernel_breakdown(model, arch, int(b)) for b in args.profile_batches.split(",")]
        del model
        torch.cuda.empty_cache()
        (out_dir / "decode_latency.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
