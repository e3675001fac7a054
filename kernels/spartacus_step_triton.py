"""A whole Spartacus decode step of one sequence as one persistent Triton kernel (same function as
`kernels/spartacus_step.py`).

At batch 1 a step is a chain of ~80 kernels, most of them one-row GEMVs that stream a weight matrix
once. Between two kernels the weight stream stops: the last tiles drain, the next kernel's programs
become resident, and only then do their first loads go out (~1.5 µs a boundary on an H100). Here every
program stays resident for the whole step and the phases of a layer (qkvz GEMV · the monoid step of
each head · o GEMV · [gate; up] GEMV with SiLU·mul · down GEMV, then the LM head) are separated by grid
barriers; before waiting at a barrier each program has already issued the load of its first weight tile
of the next phase (weights do not depend on the step), meant to keep the stream going through it. The
monoid programs load their state tile before the barrier too (their slot is touched by nobody else).

Barriers: one int32 counter in global memory that every program increments (release) and polls
(acquire) until it reaches programs × barriers-so-far; activations written in a phase are read back
from L2 (`.cg`). The last program to leave resets the counter for the next launch. All programs must
be resident at once, so the grid is the SM count times what fits on an SM (from the compiled kernel's
registers and shared memory). A wait that spins too long (a program that never became resident) gives
up and counts an error instead of hanging: `errors(sw)` reads the count; tests require zero.

Measured on an H100 (bench/step_kernel.py, bench/results/step_kernel-h100.json), it loses: the batch-1
decode graph takes 1.31 ms against 1.20-1.22 ms for the per-layer kernels. A grid barrier costs 1.05 /
1.40 / 1.75 / 2.27 µs at 1 / 2 / 3 / 4 programs per SM (the arrivals queue on one L2 address), 81 of them
per step; the one weight tile each program holds in registers across a barrier does not keep the bus busy
through it; and the registers cap the programs per SM (128 at the compiler's choice: 2 per SM). What
would make it pay: more bytes in flight per program than registers allow (asynchronous copies into
shared memory). Hence opt-in (models/spartacus.py STEP_KERNEL, HYBRIDSERVE_STEP_KERNEL=1).

Each GEMV phase is the streamed GEMV of kernels/fused_triton.py (contiguous runs of row blocks per
program, next tile loaded before the current product) and the monoid phase is the fused decode of
kernels/monoid_triton.py, so the step does the same arithmetic in the same order as the per-kernel path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hybridserve.kernels import pdl
from hybridserve.kernels.fused_triton import _sm_count, _stream_rows, _stream_span, _stream_tile
from hybridserve.kernels.monoid_triton import _check_pool, _fused_head_step
from hybridserve.kernels.spartacus_step import StepWeights

PROGRAMS_PER_SM = 4      # at most; fewer where the compiled kernel does not fit 4 on an SM
WARPS = 8
# Register cap per thread (None: the compiler's choice, 128, which fits 2 programs on an SM; 96 / 80 / 64
# fit 2 / 3 / 4 at the cost of spilled scalars). Measured on an H100 (step_kernel-h100.json): 2 per SM at
# 128 or 96 registers 1.35 ms, 3 or 4 per SM 1.37 ms: the barriers cost more with more programs.
MAXNREG: int | None = None
BN = 4                   # rows per block (2 for the stacked [gate; up] pair)
BK_MAX = 2048
BV = 16                  # value columns of a state tile in the monoid phase: H · d/BV programs
SPIN_LIMIT = 1 << 22     # polls before a barrier wait gives up (~seconds; a healthy wait is < 0.2 ms)


@triton.jit
def _opaque(x, COMPILED: tl.constexpr):
    """x, through a volatile move the compiler cannot see through (compiled only; the interpreter has no asm)."""
    if COMPILED:
        x = tl.inline_asm_elementwise("mov.u32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1)
    return x


@triton.jit
def _poll(bar_ptr):
    """The counter's current value, read with acquire semantics by one thread (a compare-and-swap that
    never swaps: an atomic add of 0 is folded away). Measured against acquire loads by every thread, and
    against arrivals spread over 4-16 counters polled together: those cost 3-20 µs a barrier
    (bench/results/step_kernel-h100.json)."""
    return tl.atomic_cas(bar_ptr, -1, -1, sem="acquire", scope="gpu")


@triton.jit
def _grid_sync(bar_ptr, k, ok, spin_limit):
    """Barrier k (0, 1, …) of the launch: wait until every program has arrived (the counter reaches
    programs × (k + 1)). `ok` turns 0 on time-out, and then no later barrier waits."""
    target = tl.num_programs(0) * (k + 1)
    tl.debug_barrier()                                  # every warp's stores of this phase are issued
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
    seen = _poll(bar_ptr)
    spins = 0
    while (seen < target) & (ok != 0):
        seen = _poll(bar_ptr)
        spins += 1
        ok = ok & (spins < spin_limit).to(tl.int32)
    tl.debug_barrier()
    return ok


@triton.jit
def _grid_exit(bar_ptr, ok):
    """Count a time-out, and let the last program out reset the counters for the next launch (every
    other program has left its last wait by then)."""
    if ok == 0:
        tl.atomic_add(bar_ptr + 2, 1)
    if tl.atomic_add(bar_ptr + 1, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1:
        tl.atomic_xchg(bar_ptr, 0)
        tl.atomic_xchg(bar_ptr + 1, 0)


@triton.jit
def _step_kernel(ids_ptr, slot_ptr, emb_ptr, an_ptr, qkvz_ptr, qn_ptr, kn_ptr, zb_ptr, ow_ptr, fn_ptr, gu_ptr,
                 dw_ptr, nrm_ptr, head_ptr, s_ptr, s_layer, hbuf_ptr, zero_ptr, act_ptr, dlt_ptr, ob_ptr, g_ptr,
                 out_ptr, bar_ptr, V, eps, spin_limit,
                 L: tl.constexpr, E: tl.constexpr, H: tl.constexpr, D: tl.constexpr, GD: tl.constexpr,
                 FF: tl.constexpr, QN: tl.constexpr, KN: tl.constexpr, BN: tl.constexpr, BKE: tl.constexpr,
                 BKA: tl.constexpr, BKI: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BW: tl.constexpr,
                 Q_FULL: tl.constexpr, K_FULL: tl.constexpr, HAS_ZB: tl.constexpr, SOFTPLUS: tl.constexpr,
                 COMPILED: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    A: tl.constexpr = H * D
    NQ: tl.constexpr = 3 * A + H * GD
    KTE: tl.constexpr = (E + BKE - 1) // BKE
    KTA: tl.constexpr = (A + BKA - 1) // BKA
    KTI: tl.constexpr = (FF + BKI - 1) // BKI
    NVB: tl.constexpr = (D + BV - 1) // BV
    HV: tl.constexpr = H * NVB
    dt = act_ptr.dtype.element_ty
    tok = tl.load(ids_ptr).to(tl.int64)
    slot = tl.load(slot_ptr).to(tl.int64)
    rk = tl.arange(0, BD)
    # each program's share of every matrix (the same for all layers, but recomputed from an opaque copy of
    # the program id in each phase: hoisted out of the layer loop, every phase's tile addresses would stay
    # live in registers for the whole step)
    r0q, eq, Tq = _stream_span(NQ, pid, G, BN, KTE)
    ok = 1
    nbar = 0
    w, u = _stream_tile(qkvz_ptr, NQ, E, r0q, eq, 0, Tq, BN, BKE, KTE, False, EW="")
    for layer in range(L):
        li = tl.cast(layer, tl.int64)
        if layer == 0:
            hin = emb_ptr + tok * E
            dl = zero_ptr
        else:
            hin = hbuf_ptr + E
            dl = dlt_ptr
        # 1. h = h + δ (kept in hbuf[0]); qkvz = RMSNorm(h) · Wqkvz
        _stream_rows(hin, dl, hbuf_ptr, an_ptr + li * E, qkvz_ptr + li * (NQ * E), act_ptr, NQ, E, eps, r0q, eq, Tq,
                     w, u, pid == 0, BN, BKE, KTE, True, True, False, True, EW="")
        s_l = s_ptr + li * s_layer
        r0o, eo, To = _stream_span(E, _opaque(pid, COMPILED), G, BN, KTA)
        rv = (pid % NVB) * BV + tl.arange(0, BV)
        s_off = ((slot * H + pid // NVB) * D + rk[:, None]) * D + rv[None, :]
        S = tl.load(s_l + s_off, mask=(rk < D)[:, None] & ((rv < D) & (rv * 0 + pid < HV))[None, :], other=0.)
        wo, uo = _stream_tile(ow_ptr + li * (E * A), E, A, r0o, eo, 0, To, BN, BKA, KTA, False, EW="")
        ok = _grid_sync(bar_ptr, nbar, ok, spin_limit)
        nbar += 1
        # 2. the monoid step of each (head, value block): state tile S, output o
        for r in range(pid, HV, G):
            hh = r // NVB
            rv = (r % NVB) * BV + tl.arange(0, BV)
            s_off = ((slot * H + hh) * D + rk[:, None]) * D + rv[None, :]
            ms = (rk < D)[:, None] & (rv < D)[None, :]
            if r != pid:
                S = tl.load(s_l + s_off, mask=ms, other=0.)
            S, o = _fused_head_step(act_ptr, qn_ptr + li * QN, kn_ptr + li * KN, zb_ptr + li * (H * GD), S, hh,
                                    rv, eps, dt, H, D, GD, BD, BW, Q_FULL, K_FULL, HAS_ZB, SOFTPLUS, True)
            tl.store(s_l + s_off, S, mask=ms)
            tl.store(ob_ptr + hh * D + rv, o.to(dt), mask=rv < D)
        ok = _grid_sync(bar_ptr, nbar, ok, spin_limit)
        nbar += 1
        # 3. δ = o · Wo
        _stream_rows(ob_ptr, ob_ptr, hbuf_ptr, ob_ptr, ow_ptr + li * (E * A), dlt_ptr, E, A, eps, r0o, eo, To,
                     wo, uo, False, BN, BKA, KTA, False, False, False, True, EW="")
        r0g, eg, Tg = _stream_span(FF, _opaque(pid, COMPILED), G, BN // 2, KTE)
        w2, u2 = _stream_tile(gu_ptr + li * (2 * FF * E), FF, E, r0g, eg, 0, Tg, BN // 2, BKE, KTE, True, EW="")
        ok = _grid_sync(bar_ptr, nbar, ok, spin_limit)
        nbar += 1
        # 4. h = h + δ (kept in hbuf[1]); g = SiLU(gate) · up of RMSNorm(h) · W[gate; up]
        _stream_rows(hbuf_ptr, dlt_ptr, hbuf_ptr + E, fn_ptr + li * E, gu_ptr + li * (2 * FF * E), g_ptr, FF, E,
                     eps, r0g, eg, Tg, w2, u2, pid == 0, BN // 2, BKE, KTE, True, True, True, True, EW="")
        r0d, ed, Td = _stream_span(E, _opaque(pid, COMPILED), G, BN, KTI)
        w3, u3 = _stream_tile(dw_ptr + li * (E * FF), E, FF, r0d, ed, 0, Td, BN, BKI, KTI, False, EW="")
        ok = _grid_sync(bar_ptr, nbar, ok, spin_limit)
        nbar += 1
        # 5. δ = g · Wdown
        _stream_rows(g_ptr, g_ptr, hbuf_ptr, g_ptr, dw_ptr + li * (E * FF), dlt_ptr, E, FF, eps, r0d, ed, Td,
                     w3, u3, False, BN, BKI, KTI, False, False, False, True, EW="")
        if layer + 1 < L:
            r0q, eq, Tq = _stream_span(NQ, _opaque(pid, COMPILED), G, BN, KTE)
            w, u = _stream_tile(qkvz_ptr + (li + 1) * (NQ * E), NQ, E, r0q, eq, 0, Tq, BN, BKE, KTE, False, EW="")
        else:
            r0q, eq, Tq = _stream_span(V, _opaque(pid, COMPILED), G, BN, KTE)
            w, u = _stream_tile(head_ptr, V, E, r0q, eq, 0, Tq, BN, BKE, KTE, False, EW="")
        ok = _grid_sync(bar_ptr, nbar, ok, spin_limit)
        nbar += 1
    # the logits of RMSNorm(h + δ), fp32
    _stream_rows(hbuf_ptr + E, dlt_ptr, hbuf_ptr, nrm_ptr, head_ptr, out_ptr, V, E, eps, r0q, eq, Tq, w, u, False,
                 BN, BKE, KTE, True, True, False, True, EW="")
    _grid_exit(bar_ptr, ok)


class _Workspace:
    """Activations between phases and the barrier counters of one StepWeights on one device."""

    def __init__(self, sw: StepWeights):
        dev, dt = sw.qkvz.device, sw.qkvz.dtype
        E, A, FF = sw.qkvz.shape[2], sw.num_heads * sw.head_dim, sw.down.shape[2]
        self.h = torch.zeros(2, E, device=dev, dtype=dt)          # the residual stream, ping-pong
        self.zero = torch.zeros(E, device=dev, dtype=dt)          # layer 0's pending δ
        self.act = torch.zeros(sw.qkvz.shape[1], device=dev, dtype=dt)
        self.delta = torch.zeros(E, device=dev, dtype=dt)
        self.o = torch.zeros(A, device=dev, dtype=dt)
        self.g = torch.zeros(FF, device=dev, dtype=dt)
        self.bar = torch.zeros(4, device=dev, dtype=torch.int32)  # arrivals, departures, time-outs
        self.grid = None


def _workspace(sw: StepWeights) -> _Workspace:
    ws = getattr(sw, "_step_workspace", None)
    if ws is None:
        ws = _Workspace(sw)
        sw._step_workspace = ws
    return ws


def _resident_per_sm(compiled, device_index: int) -> int:
    """How many programs of the compiled kernel one SM holds at once (registers, threads, shared memory)."""
    props = torch.cuda.get_device_properties(device_index)
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    threads = getattr(props, "max_threads_per_multi_processor", 2048)
    smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    if hasattr(compiled, "_init_handles"):
        compiled._init_handles()
    n_regs = max(int(getattr(compiled, "n_regs", 0) or 0), 1)
    per_warp = -(-n_regs * 32 // 256) * 256                     # registers go out per warp in units of 256
    by_regs = regs // (per_warp * WARPS)
    by_threads = threads // (32 * WARPS)
    shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    by_smem = smem // (shared + 1024) if shared else by_threads
    return min(by_regs, by_threads, by_smem)


def _args(sw: StepWeights, ws: _Workspace, input_ids, slot_ids, states, logits):
    H, D = sw.num_heads, sw.head_dim
    A = H * D
    E, FF = sw.qkvz.shape[2], sw.down.shape[2]
    bk = lambda K: min(BK_MAX, triton.next_power_of_2(K))   # noqa: E731
    args = (input_ids, slot_ids, sw.embed, sw.attn_norm, sw.qkvz, sw.q_norm, sw.k_norm,
            sw.decay_bias if sw.decay_bias is not None else sw.q_norm, sw.o, sw.ffn_norm, sw.gate_up, sw.down,
            sw.norm, sw.lm_head, states, states.stride(0), ws.h, ws.zero, ws.act, ws.delta, ws.o, ws.g, logits,
            ws.bar, sw.lm_head.shape[0], sw.eps, SPIN_LIMIT)
    meta = dict(L=sw.num_layers, E=E, H=H, D=D, GD=(sw.qkvz.shape[1] - 3 * A) // H, FF=FF,
                QN=sw.q_norm.shape[1], KN=sw.k_norm.shape[1], BN=BN, BKE=bk(E), BKA=bk(A), BKI=bk(FF),
                BD=triton.next_power_of_2(D), BV=min(BV, triton.next_power_of_2(D)),
                BW=triton.next_power_of_2(A), Q_FULL=sw.q_norm.shape[1] == A, K_FULL=sw.k_norm.shape[1] == A,
                HAS_ZB=sw.decay_bias is not None, SOFTPLUS=sw.decay_gate == "neg_softplus",
                COMPILED=sw.qkvz.is_cuda, num_warps=WARPS, num_stages=1, **pdl.register_cap(MAXNREG, sw.qkvz.device))
    return args, meta


def decode_step(sw: StepWeights, input_ids: torch.Tensor, slot_ids: torch.Tensor,
                states: torch.Tensor) -> torch.Tensor:
    """See kernels/spartacus_step.py. One launch; CUDA-graph safe (fixed workspace, no host syncs)."""
    assert input_ids.numel() == 1 and slot_ids.numel() == 1, "the step kernel serves one sequence"
    L, H, D = sw.num_layers, sw.num_heads, sw.head_dim
    assert states.shape[0] == L
    _check_pool(states[0], H, D, D)
    for t in (sw.embed, sw.qkvz, sw.o, sw.gate_up, sw.down, sw.lm_head):
        assert t.is_contiguous()
    ws = _workspace(sw)
    logits = torch.empty(1, sw.lm_head.shape[0], device=sw.qkvz.device, dtype=torch.float32)
    args, meta = _args(sw, ws, input_ids, slot_ids, states, logits)
    if ws.grid is None:
        if sw.qkvz.is_cuda:
            dev = sw.qkvz.device.index if sw.qkvz.device.index is not None else torch.cuda.current_device()
            compiled = _step_kernel.warmup(*args, grid=(1,), **meta)
            per_sm = min(PROGRAMS_PER_SM, _resident_per_sm(compiled, dev))
            if per_sm < 1:
                raise RuntimeError("the Spartacus step kernel does not fit on an SM")
            ws.grid = per_sm * _sm_count(dev)
        else:
            ws.grid = 1          # the interpreter runs programs one after another: a barrier needs one
    _step_kernel[(ws.grid,)](*args, **meta)
    return logits


def errors(sw: StepWeights) -> int:
    """Barrier waits that gave up so far (a program was never resident); 0 on a healthy device. Syncs."""
    ws = getattr(sw, "_step_workspace", None)
    return 0 if ws is None else int(ws.bar[2].item())


def counters(sw: StepWeights) -> list[int]:
    """The arrival and departure counters (all 0 between launches). Syncs."""
    ws = getattr(sw, "_step_workspace", None)
    return [] if ws is None else ws.bar[:2].tolist()
