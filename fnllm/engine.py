"""``LLMEngine``: the imperative shell around the pure core.

It holds the current :class:`~fnllm.state.EngineState`, an executor and a
tokenizer. ``step()`` reads the clock once, then runs ``schedule`` (pure),
``execute`` (the device) and ``commit`` (pure); stop strings are found here,
on the detokenized text, and end their sequence through the pure
``finish_sequence``. Bad input raises ``ValueError`` naming the problem and
leaves the engine as it was: the other requests keep running and no KV
block is lost.
"""

from __future__ import annotations

import operator
import time
from itertools import repeat
from typing import Callable, Iterable, Sequence

import attrs

from fnllm.config import EngineConfig
from fnllm.errors import EngineDeadError
from fnllm.faults import plan_subset, repair_after_failure, rerunnable
from fnllm.lifecycle import abort_request, add_request, finish_sequence, initial_state, truncated
from fnllm.outputs import CompletionOutput, RequestOutput, logprob_dict
from fnllm.schedule import schedule
from fnllm.spec import spec_stats
from fnllm.state import (
    BatchPlan, EngineState, Executor, Outputs, Rejection, Request, RequestOutputKind, SamplingParams, StepOutput,
)
from fnllm.step import check_output, commit

PromptType = str | Sequence[int] | dict


def _is_array(x) -> bool:
    """A numpy (or similar) array of ids, told by its interface, without importing numpy."""
    return hasattr(x, "tolist") and hasattr(x, "shape") and hasattr(x, "dtype")


def _token_ids(ids) -> list[int] | tuple[int, ...]:
    """Token ids as plain ints (a tuple of them as it is, else a new list):
    numpy integers and 0-d arrays are fine, bools,
    floats and strings are not (``ValueError`` naming the first bad one)."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise ValueError(f"prompt_token_ids must be a list of integers, got {type(ids).__name__}")
    if type(ids) in (list, tuple) and set(map(type, ids)) <= {int}:  # plain ints (bools are their own type)
        return ids if type(ids) is tuple else list(ids)  # the usual case; a tuple cannot change later: no copy
    out = []
    for t in ids:
        if isinstance(t, bool) or not hasattr(t, "__index__"):
            raise ValueError(f"prompt_token_ids must hold integers, got {t!r} ({type(t).__name__})")
        out.append(operator.index(t))
    return out


class _Track:
    """The shell's view of one live request: text, detokenizers, stop strings."""

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams, tokenizer):
        self.request_id, self.prompt, self.prompt_ids, self.params = request_id, prompt, prompt_ids, params
        self.tokenizer = tokenizer
        self.final_only = params.output_kind == RequestOutputKind.FINAL_ONLY  # read per token
        self.completions: dict[int, CompletionOutput] = {}
        self.num_cached_tokens: int | None = None
        self.num_draft_tokens = self.num_accepted_tokens = 0  # speculative decoding
        self.detoks: dict[int, object] = {}
        self.full_text: dict[int, str] = {}
        self.sent: dict[int, tuple[int, int]] = {}  # DELTA: tokens and characters reported, per sample
        self.prompt_lps: list | None = None
        self.prompt_ranks: list | None = None
        if params.prompt_logprobs is not None:
            self.prompt_lps, self.prompt_ranks = [None] * len(prompt_ids), [None] * len(prompt_ids)

    def add_prompt_logprobs(self, first: int, entries) -> None:
        """Entries for prompt tokens ``first, first + 1, ...``; the first value
        computed for a position is kept (a recompute after preemption repeats them)."""
        lps, ranks = self.prompt_lps, self.prompt_ranks
        if lps is None:
            return
        for p, (rank, entry) in enumerate(entries, first):
            if p < len(lps) and lps[p] is None:
                lps[p], ranks[p] = logprob_dict(entry), rank

    def completion(self, index: int) -> CompletionOutput:
        c = self.completions.get(index)
        if c is None:
            c = self.completions[index] = CompletionOutput(index=index)
            self.full_text[index] = ""
            if self.params.logprobs is not None:
                c.logprobs = []
            if self.tokenizer is not None:
                from fnllm.tokenizer import IncrementalDetokenizer

                self.detoks[index] = IncrementalDetokenizer(self.tokenizer)
        return c

    def add_token(self, index: int, token: int, logprobs) -> str | None:
        """Record ``token``; the stop string it completed, if any."""
        c = self.completion(index)
        c.token_ids.append(token)
        if logprobs is not None and c.logprobs is not None:
            c.logprobs.append(logprob_dict(logprobs))
        det = self.detoks.get(index)
        if det is None:
            return None
        before = len(self.full_text[index])
        self.full_text[index] += det.push([token])
        return self._check_stop(index, before)

    def _check_stop(self, index: int, before: int) -> str | None:
        from fnllm.tokenizer import find_stop, stream_safe_len

        text = self.full_text[index]
        c = self.completions[index]
        if c.finish_reason is None and self.params.stop:
            hit = find_stop(text, self.params.stop, before)
            if hit is not None:
                pos, stop = hit
                keep = pos + len(stop) if self.params.include_stop_str_in_output else pos
                c.text, c.finish_reason, c.stop_reason = text[:keep], "stop", stop
                return stop
            # while running, hold back a tail that may still become a stop string
            # (the final text is never shorter than what was streamed)
            c.text = text[: stream_safe_len(text, self.params.stop, self.params.include_stop_str_in_output)]
            return None
        c.text = text
        return None

    def flush(self, index: int) -> None:
        """At the end of a sequence: emit what the detokenizer held back."""
        det = self.detoks.get(index)
        if det is not None:
            before = len(self.full_text[index])
            self.full_text[index] += det.finish()
            self._check_stop(index, before)
            c = self.completions[index]
            if c.finish_reason is None:
                c.text = self.full_text[index]  # ended by length/EOS: nothing is held back any more

    def output(self, finished: bool) -> RequestOutput:
        """The request's output (a copy: later steps never change it); under
        ``DELTA`` only the tokens, logprobs and text not reported before.
        A finished request's track is dropped by the caller, so its last
        output hands over the track's own lists instead of copies."""
        delta = self.params.output_kind == RequestOutputKind.DELTA
        if finished and not delta:
            outs = [self.completions[i] for i in sorted(self.completions)]
            prompt_ids, lps, ranks = self.prompt_ids, self.prompt_lps, self.prompt_ranks
        else:
            outs = [self._snapshot(self.completions[i], delta) for i in sorted(self.completions)]
            prompt_ids = list(self.prompt_ids)
            lps = None if self.prompt_lps is None else list(self.prompt_lps)
            ranks = None if self.prompt_ranks is None else list(self.prompt_ranks)
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=prompt_ids,
            outputs=outs, finished=finished, num_cached_tokens=self.num_cached_tokens,
            prompt_logprobs=lps, prompt_logprob_ranks=ranks,
            num_draft_tokens=self.num_draft_tokens, num_accepted_tokens=self.num_accepted_tokens,
        )

    def _snapshot(self, c: CompletionOutput, delta: bool) -> CompletionOutput:
        lps = c.logprobs
        if not delta:
            return attrs.evolve(c, token_ids=list(c.token_ids), logprobs=None if lps is None else list(lps))
        n_tok, n_text = self.sent.get(c.index, (0, 0))
        self.sent[c.index] = (len(c.token_ids), len(c.text))
        return attrs.evolve(
            c, token_ids=c.token_ids[n_tok:], text=c.text[n_text:], logprobs=None if lps is None else lps[n_tok:]
        )


class LLMEngine:
    """Step-function API: ``add_request``, ``step``, ``abort_request``,
    ``has_unfinished_requests``, and the current ``state``.

    ``step`` is a transaction: ``self.state`` is replaced only when the
    executor and commit succeed, and the step's deliveries (abort and error
    outputs) happen in the same transaction. A failed execute is retried
    once (unless it swaps blocks out: see :func:`fnllm.faults.rerunnable`);
    if it fails again, the state is repaired
    (:func:`fnllm.faults.repair_after_failure`) and the plan's requests are
    bisected through sub-plans (:func:`fnllm.faults.plan_subset`): every
    request whose sub-plan fails alone ends with ``finish_reason="error"``,
    the others carry on from the next step. A failed step counts towards
    ``max_consecutive_failures`` unless some sub-plan ran (the device works)
    and a culprit was found; at that count (a dead device) ``step`` raises
    :class:`~fnllm.errors.EngineDeadError`, and so does every later call. An
    executor that raises ``EngineDeadError`` itself (a dead worker) ends the
    engine at once, without retry or isolation.
    """

    def __init__(
        self,
        config: EngineConfig,
        executor: Executor,
        tokenizer=None,
        *,
        clock: Callable[[], float] = time.monotonic,
        recorder=None,
        max_consecutive_failures: int = 3,
        kv_offload=None,
    ) -> None:
        if not isinstance(max_consecutive_failures, int) or max_consecutive_failures < 1:
            raise ValueError(f"max_consecutive_failures must be an integer >= 1, got {max_consecutive_failures!r}")
        positions = getattr(executor, "max_position_embeddings", None)
        if positions is not None and config.scheduler.max_model_len > positions:
            raise ValueError(
                f"max_model_len={config.scheduler.max_model_len} exceeds the model's max_position_embeddings={positions}"
            )
        if config.model.batch_invariant and getattr(executor, "batch_invariant", None) is False:
            raise ValueError("config.model.batch_invariant is set but the executor was built without it "
                             "(ModelExecutor(..., batch_invariant=True) or ModelExecutor.from_engine_config)")
        self.config, self.executor, self.tokenizer = config, executor, tokenizer
        self.kv_offload = kv_offload  # the disk KV tier's hooks (fnllm.offload.KVOffload), or None
        self.state: EngineState = initial_state(config)
        self._clock, self.recorder = clock, recorder
        self._tracks: dict[str, _Track] = {}
        self._ended: dict[str, tuple[str, str | None]] = {}  # request -> (finish reason, error), not yet delivered
        self.max_consecutive_failures = max_consecutive_failures
        self.consecutive_failures = 0
        self.dead: EngineDeadError | None = None
        self._unscheduled: set[str] = set()  # requests not yet in a plan (num_cached_tokens unknown)
        self.last_plan: BatchPlan | None = None
        self.last_news: Outputs = Outputs()  # the core's news of the last committed step (for shells)
        if recorder is not None:
            recorder.start(config)

    # -- input --------------------------------------------------------------------
    def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int] | tuple[int, ...]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), _token_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; give prompt_token_ids instead")
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, (list, tuple)) or _is_array(prompt):
            return None, _token_ids(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def add_request(
        self, request_id: str, prompt: PromptType, sampling_params: SamplingParams | None = None, priority: int = 0
    ) -> None:
        """Queue a request; ``ValueError`` (and no change) when it cannot be served."""
        if self.dead is not None:
            raise self.dead
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer to find them in the text; use stop_token_ids instead")
        if params.guided_decoding is not None:
            self._check_guided(params)
        text, ids = self._prompt_ids(prompt)
        if request_id in self._tracks:
            raise ValueError(f"request_id {request_id!r} is already in use by a live request")
        if params.bad_words:
            params = self._resolve_bad_words(params)
        req = truncated(Request(request_id=request_id, prompt_token_ids=tuple(ids), sampling=params, priority=priority))
        ids = list(req.prompt_token_ids)
        out = add_request(self.state, req, self.config)
        if isinstance(out, Rejection):
            raise ValueError(f"request {request_id!r} rejected: {out.reason}")
        self.state = out
        self._tracks[request_id] = _Track(request_id, text, ids, params, self.tokenizer)
        self._unscheduled.add(request_id)
        if self.recorder is not None:
            self.recorder.add(self.state.step, out.requests[request_id], arrival=self._clock())
        if self.kv_offload is not None and params.prompt_logprobs is None:  # disk reads, before the step that needs them
            self.state, first, count = self.kv_offload.stage(self.state, request_id)
            if count and self.recorder is not None:
                self.recorder.stage(self.state.step, request_id, first, count)

    def _check_guided(self, params: SamplingParams) -> None:
        """Guided decoding compiles (xgrammar, cached) for this model's vocabulary: else ``ValueError``."""
        if self.tokenizer is None:
            raise ValueError("guided_decoding needs the model's tokenizer (this engine has none)")
        from fnllm.guided import grammar_compiler

        grammar_compiler(self.tokenizer, self.config.model.vocab_size).compile(params.guided_decoding)

    def _resolve_bad_words(self, params: SamplingParams) -> SamplingParams:
        """``params`` with its ``bad_words`` tokenized into ``bad_words_token_ids``."""
        if self.tokenizer is None:
            raise ValueError("bad_words need a tokenizer; give bad_words_token_ids instead")
        from fnllm.tokenizer import bad_words_token_ids

        words = bad_words_token_ids(self.tokenizer, params.bad_words)
        merged = tuple(dict.fromkeys(params.bad_words_token_ids + words))
        return attrs.evolve(params, bad_words_token_ids=merged)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Abort one or several requests; unknown, finished or already aborted
        ids are ignored. Each aborted request gets one last output
        (``finish_reason="abort"``) from the next ``step``."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            if rid not in self._tracks or rid in self._ended:
                continue
            self.state = abort_request(self.state, rid)
            self._ended[rid] = ("abort", None)
            if self.recorder is not None:
                self.recorder.abort(self.state.step, rid)

    def has_unfinished_requests(self) -> bool:
        return bool(self.state.requests) or bool(self._ended)

    def get_num_unfinished_requests(self) -> int:
        return len(self.state.requests)

    # -- the loop turn ----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduling step; the outputs of every request it touched.

        With no live request it only delivers pending abort outputs: the
        state and the trace do not move."""
        if self.dead is not None:
            raise self.dead
        if not self.state.requests:
            return self._deliver_ended()
        before = self.state
        self.last_news = Outputs()
        mid, plan = schedule(before, self.config, now=self._clock())
        output, error = self._execute(before, plan)
        if error is not None:
            return self._recover(before, plan, error)
        state, news = commit(mid, plan, output, self.config, checked=True)
        self.last_news = news
        if output.prompt_logprobs is not None:
            self._note_prompt_logprobs(plan, output)
        results = self._deliver_ended()
        self.state, self.last_plan, self.consecutive_failures = state, plan, 0
        if self.recorder is not None:
            self.recorder.step(plan, output, state)
        if self._unscheduled:
            self._note_cached(plan)
        if self.kv_offload is not None:
            self.kv_offload.save(plan, state)
        return results + self._absorb(news)

    def _run_plan(self, plan: BatchPlan) -> StepOutput:
        """Execute ``plan`` and check the output's shape (a bad output is a device fault)."""
        out = self.executor.execute(plan) if plan.has_device_work else StepOutput()
        check_output(plan, out, self.config.model.vocab_size)
        return out

    def _execute(self, before: EngineState, plan: BatchPlan) -> tuple[StepOutput | None, Exception | None]:
        """The plan's output, retried once; or the last error. An interrupt
        (KeyboardInterrupt, ...) repairs the state before it propagates."""
        error = None
        for _ in range(2 if rerunnable(plan) else 1):
            try:
                return self._run_plan(plan), None
            except EngineDeadError as e:  # the executor can never run again (e.g. a dead worker)
                self._fail_hard(before, plan, e)
            except Exception as e:  # noqa: BLE001 - any other device failure is isolated below
                error = e
            except BaseException as e:
                self._fail_hard(before, plan, e)
        return None, error

    def _fail_hard(self, before: EngineState, plan: BatchPlan, exc: BaseException) -> None:
        """An interrupt, or an executor that reports it is dead: the state as
        before the step (repaired), then ``exc`` propagates."""
        self.state = repair_after_failure(before, plan, self.config)
        if self.recorder is not None:
            self.recorder.fault(plan, [])
        if isinstance(exc, EngineDeadError):
            self.dead = exc
        raise exc

    def _recover(self, before: EngineState, plan: BatchPlan, error: Exception) -> list[RequestOutput]:
        """After a plan failed twice: repair the state, isolate poison requests."""
        state = repair_after_failure(before, plan, self.config)
        try:
            blamed, healthy = self._find_culprits(plan, error) if rerunnable(plan) else ({}, False)
        except BaseException as e:  # an interrupt, or the executor dying, while probing
            self._fail_hard(before, plan, e)
        for rid in blamed:
            state = abort_request(state, rid)
        # the count resets only when a sub-plan ran (the device works) and culprits were found
        failures = 0 if (healthy and blamed) else self.consecutive_failures + 1
        if self.recorder is not None:
            self.recorder.fault(plan, list(blamed))
        self.state, self.consecutive_failures = state, failures
        for rid, e in blamed.items():
            self._ended[rid] = ("error", f"the device failed on this request: {type(e).__name__}: {e}")
        if failures >= self.max_consecutive_failures:
            self.dead = EngineDeadError(
                f"engine is dead: {failures} consecutive steps failed on the executor, none of them "
                f"traced to a poison request on a working device; last error: {type(error).__name__}: {error}"
            )
            raise self.dead from error
        return self._deliver_ended()

    def _find_culprits(self, plan: BatchPlan, error: Exception) -> tuple[dict[str, Exception], bool]:
        """Bisect the failed plan's requests: those whose sub-plan fails alone,
        and whether any sub-plan ran (proof that the device works)."""
        culprits: dict[str, Exception] = {}
        healthy = False

        def probe(group: list[str]) -> Exception | None:
            nonlocal healthy
            keep = set(group)
            try:
                self._run_plan(plan_subset(plan, [i for i, r in enumerate(plan.request_ids) if r in keep]))
            except EngineDeadError:
                raise
            except Exception as e:  # noqa: BLE001
                return e
            healthy = True
            return None

        def search(group: list[str], err: Exception) -> None:
            if len(group) == 1:
                culprits[group[0]] = err
                return
            half = len(group) // 2
            for part in (group[:half], group[half:]):
                e = probe(part)
                if e is not None:
                    search(part, e)

        search(list(dict.fromkeys(plan.request_ids)), error)
        return culprits, healthy

    def _note_prompt_logprobs(self, plan: BatchPlan, output: StepOutput) -> None:
        for rid, pos, entries in zip(plan.request_ids, plan.positions, output.prompt_logprobs):
            track = self._tracks.get(rid)
            if entries and track is not None:
                track.add_prompt_logprobs(pos + 1, entries)

    def _note_cached(self, plan: BatchPlan) -> None:
        """A request's first plan row starts at its cached prefix (any tier)."""
        for rid, pos in zip(plan.request_ids, plan.positions):
            if rid in self._unscheduled:
                self._unscheduled.discard(rid)
                self._tracks[rid].num_cached_tokens = pos

    def _deliver_ended(self) -> list[RequestOutput]:
        """The last output of every aborted or failed request, once."""
        results = []
        for rid, (why, message) in self._ended.items():
            track = self._tracks.pop(rid)
            self._unscheduled.discard(rid)
            for i in range(track.params.n):
                c = track.completion(i)
                if c.finish_reason is None:
                    c.finish_reason = why
            out = track.output(True)
            out.error = message
            results.append(out)
        self._ended = {}
        return results

    def spec_decode_stats(self) -> dict:
        """Speculative decoding counters and acceptance rate since the engine
        started (:func:`fnllm.spec.spec_stats`); zeros when it is off."""
        return spec_stats(self.state)

    def _absorb(self, news: Outputs) -> list[RequestOutput]:
        """Fold the core's news into the tracks; the outputs due (a FINAL_ONLY
        request is due only when one of its sequences ends)."""
        touched: dict[str, None] = {}
        for rid, _, drafted, accepted in news.spec:
            track = self._tracks[rid]
            track.num_draft_tokens += drafted
            track.num_accepted_tokens += accepted
        tracks = self._tracks
        for rid, idx, tok, why, stop, lp in zip(
            news.request_ids, news.indexes, news.token_ids, news.finish_reasons, news.stop_reasons,
            news.logprobs if news.logprobs is not None else repeat(None),
        ):
            track = tracks[rid]
            c = track.completions.get(idx)
            if c is None:
                c = track.completion(idx)
            elif c.finish_reason is not None:
                touched[rid] = None
                continue  # already ended by a stop string earlier in this step
            if track.tokenizer is None and lp is None:  # nothing to detokenize or convert
                c.token_ids.append(tok)
                hit = None
            else:
                hit = track.add_token(idx, tok, lp)
            if why is None and hit is None and track.final_only:
                continue
            touched[rid] = None
            if hit is not None:
                if why is None:
                    self.state = finish_sequence(self.state, rid, idx)
                    if self.recorder is not None:
                        self.recorder.finish(self.state.step, rid, idx)
            elif why is not None:
                track.flush(idx)
                if c.finish_reason is None:
                    c.finish_reason, c.stop_reason = why, stop
        results = [self._result(rid) for rid in touched]
        return [r for r in results if r is not None]

    def _result(self, rid: str) -> RequestOutput | None:
        track = self._tracks[rid]
        finished = rid not in self.state.requests
        if finished:
            del self._tracks[rid]
        elif track.final_only:
            return None
        return track.output(finished)
