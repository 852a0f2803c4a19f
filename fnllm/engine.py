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

import time
from typing import Callable, Iterable, Sequence

import attrs

from fnllm.config import EngineConfig
from fnllm.lifecycle import abort_request, add_request, finish_sequence, initial_state
from fnllm.outputs import CompletionOutput, RequestOutput, logprob_dict
from fnllm.state import BatchPlan, EngineState, Executor, Outputs, Rejection, Request, SamplingParams
from fnllm.step import step as core_step

PromptType = str | Sequence[int] | dict


class _Track:
    """The shell's view of one live request: text, detokenizers, stop strings."""

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams, tokenizer):
        self.request_id, self.prompt, self.prompt_ids, self.params = request_id, prompt, prompt_ids, params
        self.tokenizer = tokenizer
        self.completions: dict[int, CompletionOutput] = {}
        self.num_cached_tokens: int | None = None
        self.detoks: dict[int, object] = {}
        self.full_text: dict[int, str] = {}

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
        from fnllm.tokenizer import find_stop

        text = self.full_text[index]
        c = self.completions[index]
        if c.finish_reason is None and self.params.stop:
            hit = find_stop(text, self.params.stop, before)
            if hit is not None:
                pos, stop = hit
                keep = pos + len(stop) if self.params.include_stop_str_in_output else pos
                c.text, c.finish_reason, c.stop_reason = text[:keep], "stop", stop
                return stop
        c.text = text
        return None

    def flush(self, index: int) -> None:
        """At the end of a sequence: emit what the detokenizer held back."""
        det = self.detoks.get(index)
        if det is not None:
            before = len(self.full_text[index])
            self.full_text[index] += det.finish()
            self._check_stop(index, before)

    def output(self, finished: bool) -> RequestOutput:
        outs = [
            attrs.evolve(c, token_ids=list(c.token_ids), logprobs=None if c.logprobs is None else list(c.logprobs))
            for c in (self.completions[i] for i in sorted(self.completions))
        ]
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=list(self.prompt_ids),
            outputs=outs, finished=finished, num_cached_tokens=self.num_cached_tokens,
        )


class LLMEngine:
    """Step-function API: ``add_request``, ``step``, ``abort_request``,
    ``has_unfinished_requests``, and the current ``state``."""

    def __init__(
        self,
        config: EngineConfig,
        executor: Executor,
        tokenizer=None,
        *,
        clock: Callable[[], float] = time.monotonic,
        recorder=None,
        kv_offload=None,
    ) -> None:
        self.config, self.executor, self.tokenizer = config, executor, tokenizer
        self.kv_offload = kv_offload  # the disk KV tier's hooks (fnllm.offload.KVOffload), or None
        self.state: EngineState = initial_state(config)
        self._clock, self.recorder = clock, recorder
        self._tracks: dict[str, _Track] = {}
        self._aborted: list[str] = []
        self._unscheduled: set[str] = set()  # requests not yet in a plan (num_cached_tokens unknown)
        self.last_plan: BatchPlan | None = None
        if recorder is not None:
            recorder.start(config)

    # -- input --------------------------------------------------------------------
    def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
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
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def add_request(
        self, request_id: str, prompt: PromptType, sampling_params: SamplingParams | None = None, priority: int = 0
    ) -> None:
        """Queue a request; ``ValueError`` (and no change) when it cannot be served."""
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        text, ids = self._prompt_ids(prompt)
        if request_id in self._tracks:
            raise ValueError(f"request_id {request_id!r} is already in use by a live request")
        req = Request(request_id=request_id, prompt_token_ids=tuple(ids), sampling=params, priority=priority)
        out = add_request(self.state, req, self.config)
        if isinstance(out, Rejection):
            raise ValueError(f"request {request_id!r} rejected: {out.reason}")
        self.state = out
        self._tracks[request_id] = _Track(request_id, text, ids, params, self.tokenizer)
        self._unscheduled.add(request_id)
        if self.recorder is not None:
            self.recorder.add(self.state.step, out.requests[request_id])
        if self.kv_offload is not None:  # disk reads happen here, before the step that needs them
            self.state, first, count = self.kv_offload.stage(self.state, request_id)
            if count and self.recorder is not None:
                self.recorder.stage(self.state.step, request_id, first, count)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Abort one or several requests; unknown or finished ids are ignored.
        Each aborted request gets one last output (``finish_reason="abort"``)
        from the next ``step``."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            if rid not in self._tracks:
                continue
            self.state = abort_request(self.state, rid)
            self._aborted.append(rid)
            if self.recorder is not None:
                self.recorder.abort(self.state.step, rid)

    def has_unfinished_requests(self) -> bool:
        return bool(self.state.requests) or bool(self._aborted)

    def get_num_unfinished_requests(self) -> int:
        return len(self.state.requests)

    # -- the loop turn ----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduling step; the outputs of every request it touched."""
        results = self._drain_aborted()
        state, plan, output, news = core_step(self.state, self.executor, self.config, now=self._clock())
        self.state, self.last_plan = state, plan
        if self.recorder is not None:
            self.recorder.step(plan, output, state)
        if self._unscheduled:
            self._note_cached(plan)
        if self.kv_offload is not None:
            self.kv_offload.save(plan, state)
        return results + self._absorb(news)

    def _note_cached(self, plan: BatchPlan) -> None:
        """A request's first plan row starts at its cached prefix (any tier)."""
        for rid, pos in zip(plan.request_ids, plan.positions):
            if rid in self._unscheduled:
                self._unscheduled.discard(rid)
                self._tracks[rid].num_cached_tokens = pos

    def _drain_aborted(self) -> list[RequestOutput]:
        results = []
        for rid in self._aborted:
            track = self._tracks.pop(rid)
            self._unscheduled.discard(rid)
            for i in range(track.params.n):
                c = track.completion(i)
                if c.finish_reason is None:
                    c.finish_reason = "abort"
            results.append(track.output(True))
        self._aborted = []
        return results

    def _absorb(self, news: Outputs) -> list[RequestOutput]:
        touched: dict[str, None] = {}
        for rid, idx, tok, why, stop, lp in zip(
            news.request_ids, news.indexes, news.token_ids, news.finish_reasons, news.stop_reasons,
            news.logprobs if news.logprobs is not None else [None] * len(news),
        ):
            track = self._tracks[rid]
            touched[rid] = None
            c = track.completion(idx)
            if c.finish_reason is not None:
                continue  # already ended by a stop string earlier in this step
            hit = track.add_token(idx, tok, lp)
            if hit is not None:
                if why is None:
                    self.state = finish_sequence(self.state, rid, idx)
                    if self.recorder is not None:
                        self.recorder.finish(self.state.step, rid, idx)
            elif why is not None:
                track.flush(idx)
                if c.finish_reason is None:
                    c.finish_reason, c.stop_reason = why, stop
        return [self._result(rid) for rid in touched]

    def _result(self, rid: str) -> RequestOutput:
        track = self._tracks[rid]
        finished = rid not in self.state.requests
        if finished:
            del self._tracks[rid]
        return track.output(finished)
