"""The synchronous engine core: add/abort requests, and step() = schedule → forward → sample → detokenize.
Behind AsyncEngine the text is made on the front side instead (`detokenize = False`, engine/text_streams.py) and
the core hands its outputs out as columns (`step_rows`, engine/step_rows.py).

Not thread-safe by itself: AsyncEngine runs it on one thread and funnels add/abort through there.
"""
from __future__ import annotations

import logging
import operator

from hybridserve.engine.cache_pools import CachePools
from hybridserve.engine.config import EngineConfig, EngineStats, StateGroupStats
from hybridserve.engine.detokenizer import IncrementalDetokenizer
from hybridserve.engine.inflight import InFlight, TokenReadback
from hybridserve.engine.model_runner import ModelRunner, SeqChunk
from hybridserve.engine.request import FinishReason, RequestLimits, RequestOutput, SamplingParams, TokenLogprob
from hybridserve.engine.sampler import Sampler, SamplerOutput, device_from, make_generator
from hybridserve.engine.scheduler import Scheduler
from hybridserve.engine.sequence import Sequence, SeqStatus
from hybridserve.engine.step_rows import StepRows

log = logging.getLogger("hybridserve.engine")


class LLMEngine:
    def __init__(self, model, tokenizer, pools: CachePools, config: EngineConfig, max_model_len: int,
                 sampling_defaults: dict | None = None):
        self.model, self.tokenizer, self.pools, self.config = model, tokenizer, pools, config
        self.sampling_defaults = dict(sampling_defaults or {})  # the model's own, for fields a request omits
        self.max_model_len = max_model_len
        self.runner = ModelRunner(model, pools, max_model_len, pools.plan.max_concurrency, config.enforce_eager,
                                  config.max_num_batched_tokens)
        self.scheduler = Scheduler(pools, pools.plan.max_concurrency, config.max_num_batched_tokens)
        self.sampler = Sampler()
        self.seqs: dict[str, Sequence] = {}
        self.eos_ids = frozenset(tokenizer.eos_token_ids if tokenizer else [])
        # Text and stop strings here (each output's new_text), or on the front side (engine/text_streams.py):
        # then outputs carry tokens only and a request ends here on a stop token or by length.
        self.detokenize = True
        self.async_scheduling = (self.runner.graphs is not None if config.async_scheduling is None
                                 else config.async_scheduling)
        self.readback = TokenReadback(max(1, pools.plan.max_concurrency), model.device)
        self._inflight: InFlight | None = None   # a launched step whose tokens the host has not read yet
        self.num_async_steps = 0                 # steps launched before their predecessor's tokens were read
        self._state_bytes_each = pools.state_bytes_per_request() if pools.has_state else 0   # fixed per request
        self._kv_page_bytes = pools.plan.kv_page_bytes
        pages = pools.pages
        self.limits = RequestLimits(model.config.vocab_size, max_model_len,
                                    pages.capacity * pages.page_size if pools.layout.kv else None, pages.page_size)

    # -- requests -------------------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a request the engine cannot serve. Pure: safe from any thread."""
        self.limits.check(prompt_ids, params)

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self.validate(prompt_ids, params)
        if request_id in self.seqs:
            raise ValueError(f"duplicate request id {request_id}")
        seq = Sequence(request_id, list(prompt_ids), params)
        seq.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        seq.device_from = device_from(params)
        if params.seed is not None:
            seq.generator = make_generator(params.seed, self.model.device)
        if self.detokenize:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.prompt_ids, params)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    def is_waiting(self, request_id: str) -> bool:
        """Still queued for its first admission (or back in the queue after a preemption)."""
        seq = self.seqs.get(request_id)
        return seq is not None and seq.status is SeqStatus.WAITING

    # -- one step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduled step's outputs. With async scheduling a decode step's outputs come from the call after
        the one that launched it: each call launches the next step, then reads the one before."""
        return self.step_rows().outputs(self._state_bytes_each, self._kv_page_bytes)

    def step_rows(self) -> StepRows:
        """`step`'s outputs as StepRows: a row with nothing to say but its token in the columns."""
        rows = StepRows()
        if self._inflight is not None:
            self._advance(rows)
            return rows
        batch = self.scheduler.schedule()
        if not batch:
            return rows
        chunks = []
        for seq, n in zip(batch.seqs, batch.num_new):
            done_prefill = seq.num_computed + n == seq.num_tokens
            chunks.append(SeqChunk(seq.token_slice(seq.num_computed, seq.num_computed + n),
                                   seq.num_computed, seq.pages, seq.slot, done_prefill))
        try:
            logits = self.runner.run(chunks)
            sampling = [s for s, c in zip(batch.seqs, chunks) if c.want_logits]
            tokens = self._device_tokens(logits, sampling, 0) if sampling else None
            if tokens is not None and self.async_scheduling and len(sampling) == len(chunks):
                for seq, n in zip(batch.seqs, batch.num_new):
                    seq.num_computed += n
                self._inflight = self.readback.start(sampling, tokens)
                self._advance(rows)
                return rows
            if tokens is not None:
                out = SamplerOutput(tokens.tolist())
            elif sampling:
                out = self.sampler.eager(
                    logits, [s.params for s in sampling], [s.output_ids for s in sampling],
                    [s.prompt_ids for s in sampling], [s.generator for s in sampling],
                    stop_ids_per_row=[s.stop_ids for s in sampling])
        except Exception as e:  # a failed step fails its requests, never the engine
            log.exception("engine step failed")
            rows.others += [self._fail(seq, f"engine error: {type(e).__name__}: {e}") for seq in batch.seqs]
            return rows
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_computed += n
        for row, seq in enumerate(sampling):
            lp = None
            if seq.params.logprobs or seq.params.top_logprobs:
                lp = self._logprob(out, row)
            self._append(seq, out.token_ids[row], lp, rows)
        return rows

    # -- async scheduling (engine/inflight.py) -------------------------------------------------------

    def _advance(self, rows: StepRows) -> None:
        """Launch the step after the in-flight one if it may follow without the host's knowing its tokens,
        then read the in-flight step's tokens and hand out its outputs (into `rows`)."""
        prev, self._inflight = self._inflight, None
        try:
            self._inflight = self._launch_next(prev)
            ids = prev.read()
        except Exception as e:
            log.exception("engine step failed")
            seqs = {id(s): s for s in prev.seqs + (self._inflight.seqs if self._inflight is not None else [])}
            self._inflight = None
            rows.others += [self._fail(s, f"engine error: {type(e).__name__}: {e}") for s in seqs.values()
                            if s.status is SeqStatus.RUNNING]
            return
        running, append = SeqStatus.RUNNING, self._append
        for seq, t in zip(prev.seqs, ids):
            # a row finished or aborted since its launch (its extra token is dropped) is no longer running
            if seq.status is running:
                append(seq, t, None, rows)

    def _launch_next(self, prev: InFlight) -> InFlight | None:
        """The next decode step, launched with its tokens taken on the device from `prev`'s, when that is the
        step the scheduler would run anyway: every running request is a row of `prev` (no prefill to continue),
        none waiting could be admitted, each continuing row samples on the device, and the pages for one more
        token are free (preemption waits for a synchronous step). Rows `prev` finishes by length are left
        out; None when nothing may follow."""
        sched = self.scheduler
        running, max_len = sched.running, self.max_model_len
        if not running or sched.can_admit():
            return None
        if len(running) == len(prev.seqs) and all(map(operator.is_, running, prev.seqs)):
            rows = range(len(running))               # the usual case: the same rows in the same order
        else:
            rows_of = {id(s): r for r, s in enumerate(prev.seqs)}
            if any(id(s) not in rows_of for s in running):
                return None
            rows = [rows_of[id(s)] for s in running]
        picked = [(r, s) for r, s in zip(rows, running)
                  if len(s.output_ids) + 1 < s.params.max_tokens and s.num_computed + 1 < max_len]
        if not picked:
            return None
        seqs = [s for _, s in picked]
        greedy = all(s.params.greedy for s in seqs)
        graphs = self.runner.sampler_graphs
        if not self._on_device(seqs, 1, greedy, graphs is not None and graphs.covers(len(seqs))) \
                or not sched.reserve_next(seqs):
            return None
        logits = self.runner.run_next([s.num_computed for s in seqs], [s.slot for s in seqs],
                                      [s.pages for s in seqs], [r for r, _ in picked], prev.tokens)
        tokens = self.sampler.take(logits, [s.params for s in seqs], greedy, self.runner.last_argmax,
                                   self.runner.graph_sampler(len(seqs)))
        for s in seqs:
            s.num_computed += 1
        self.num_async_steps += 1
        return self.readback.start(seqs, tokens)

    def _device_tokens(self, logits, seqs: list[Sequence], unread: int):
        """The step's tokens on the device if every row samples there (Sampler.take), else None; `unread`:
        tokens each row has generated that the host has not read yet (its min_tokens count)."""
        greedy = all(s.params.greedy for s in seqs)
        graphs = self.runner.graph_sampler(len(seqs))
        if not self._on_device(seqs, unread, greedy, graphs is not None):
            return None
        return self.sampler.take(logits, [s.params for s in seqs], greedy, self.runner.last_argmax, graphs)

    @staticmethod
    def _on_device(seqs: list[Sequence], unread: int, greedy: bool, sampler_graphs: bool) -> bool:
        """sampler.on_device for every row (`greedy`: every row is), through each request's device_from."""
        return (greedy or sampler_graphs) and all(len(s.output_ids) + unread >= s.device_from for s in seqs)

    def _append(self, seq: Sequence, token: int, lp: TokenLogprob | None, rows: StepRows) -> None:
        """The host's part of a row's step (every row, every step: kept lean): record the token, its text (where
        this core detokenizes), and whether it finished the request; the output goes into `rows`."""
        p, outputs = seq.params, seq.output_ids
        outputs.append(token)
        n = len(outputs)
        reason = stop_reason = matched = None
        text = ""
        if token in seq.stop_ids and n >= p.min_tokens:
            reason, stop_reason = FinishReason.STOP, token
        elif seq.detokenizer is not None:
            text, matched = seq.detokenizer.step_token(token)
            if matched is not None:
                reason, stop_reason = FinishReason.STOP, matched
        if reason is None and (n >= p.max_tokens or len(seq.prompt_ids) + n >= self.max_model_len):
            reason = FinishReason.LENGTH
        if reason is None and lp is None and not text:
            rows.add(seq.request_id, token, n, len(seq.prompt_ids), len(seq.pages))
            return
        if reason is not None and matched is None and seq.detokenizer is not None:
            text += seq.detokenizer.flush()
        rows.others.append(RequestOutput(seq.request_id, [token], text, reason is not None, reason, stop_reason,
                                         [lp] if lp else [], len(seq.prompt_ids), n, self._state_bytes_each,
                                         len(seq.pages) * self._kv_page_bytes))
        if reason is not None:
            self.seqs.pop(seq.request_id, None)
            self.scheduler.finish(seq)

    def _fail(self, seq: Sequence, message: str) -> RequestOutput:
        self.seqs.pop(seq.request_id, None)
        self.scheduler.finish(seq)
        return RequestOutput(seq.request_id, [], "", finished=True, finish_reason=FinishReason.ERROR,
                             num_prompt_tokens=len(seq.prompt_ids), num_output_tokens=len(seq.output_ids),
                             error=message)

    def _logprob(self, out, row: int) -> TokenLogprob:
        tok = out.token_ids[row]
        conv = self.tokenizer.decode
        top = [(i, conv([i], skip_special_tokens=False), v)
               for i, v in (out.top_logprobs[row] if out.top_logprobs else [])]
        return TokenLogprob(tok, conv([tok], skip_special_tokens=False), out.logprobs[row], top)

    # -- observability --------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        pools, plan = self.pools, self.pools.plan
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_pages_used=pools.pages.num_used if pools.layout.kv else 0,
            kv_pages_total=pools.pages.capacity if pools.layout.kv else 0,
            kv_page_bytes=plan.kv_page_bytes,
            state_groups={g: StateGroupStats(pools.slots.num_used, pools.slots.num_slots, b)
                          for g, b in plan.state_slot_bytes.items()},
            weights_bytes=self.model.weights_bytes(), num_preemptions=self.scheduler.num_preemptions,
            max_concurrency=plan.max_concurrency,
        )
