"""The core's types: immutable values, nothing else.

Every class is an ``attrs`` frozen class; updates make new values. Large maps
are ``immutables.Map`` (a persistent HAMT: an update costs O(log32 n) and
shares the rest), so a step never copies pool-sized structures; the block
pool's per-block maps are versions of a rerooted store (:mod:`fnllm.pmaps`),
O(1) per update whatever the pool's size. Running
sequences are held column-wise (:class:`Running`), because a decode step
touches every running sequence and one tuple per column is far cheaper than
one record per sequence.

Token lists that grow by one token a step (a sequence's output) are cons
cells ``(token, previous_cell)`` ending in ``None``: appending is O(1) and
shares the tail. :func:`cons_tuple` turns one back into a tuple.
"""

from __future__ import annotations

import enum
import json
import math
import operator
from itertools import compress
from typing import Any, Optional, Protocol

import attrs
from immutables import Map

from fnllm.derived import note_traits_after
from fnllm.pmaps import Version, View, new_store
from fnllm.replace import slot_init

EMPTY_MAP: Map = Map()

Cons = Optional[tuple]  # (token, Cons) | None, newest token first

# A block-table entry that holds no block: with a sliding window, the leading
# blocks of a sequence that lie wholly outside its window are released and
# their entries become holes (see fnllm.blocks). The device never reads one.
HOLE = -1


class InvariantError(AssertionError):
    """A broken invariant: always a bug in fnllm, never bad input."""


# -- token cons lists ---------------------------------------------------------


def cons_push_all(cell: Cons, tokens) -> Cons:
    for t in tokens:
        cell = (t, cell)
    return cell


def cons_tuple(cell: Cons, n: int | None = None) -> tuple[int, ...]:
    """The last ``n`` tokens (all when ``n`` is None), oldest first."""
    if n is None:
        out = []
        append = out.append
        while cell is not None:
            append(cell[0])
            cell = cell[1]
        out.reverse()
        return tuple(out)
    out = [0] * n
    k = n
    try:
        while k:
            k -= 1
            out[k], cell = cell
    except TypeError:  # the list is shorter than n
        return tuple(out[k + 1 :])
    return tuple(out)


class OutputIds:
    """A sequence's output ids as plan data, O(1) to build: its cons cell and
    length, read as a tuple (``tokens``, memoized; ``last(k)`` reads only the
    newest ``k``). Compares, hashes, prints and pickles as that tuple, so a
    plan holding one is plain data (digests, replay, other processes); the
    cell lets a device extend what it derived for the cell before (same
    object) by the one new token instead of rereading the whole output."""

    __slots__ = ("cell", "n", "_tokens")

    def __init__(self, cell: Cons, n: int) -> None:
        self.cell, self.n, self._tokens = cell, n, None

    @classmethod
    def of(cls, tokens) -> "OutputIds":
        tokens = tuple(tokens)
        return cls(cons_push_all(None, tokens), len(tokens))

    def tokens(self) -> tuple[int, ...]:
        if self._tokens is None:
            self._tokens = cons_tuple(self.cell, self.n)
        return self._tokens

    def last(self, k: int) -> tuple[int, ...]:
        return cons_tuple(self.cell, min(k, self.n))

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(self.tokens())

    def __eq__(self, other) -> bool:
        if isinstance(other, OutputIds):
            return self.n == other.n and (self.cell is other.cell or self.tokens() == other.tokens())
        return isinstance(other, tuple) and self.tokens() == other

    def __hash__(self) -> int:
        return hash(self.tokens())

    def __repr__(self) -> str:
        return repr(self.tokens())

    def __reduce__(self):
        return (OutputIds.of, (self.tokens(),))


def seq_tokens(prompt: tuple[int, ...], output: Cons, num_output: int, start: int, end: int) -> tuple[int, ...]:
    """Tokens ``[start, end)`` of the sequence ``prompt + output``."""
    plen = len(prompt)
    if end <= plen:
        return prompt[start:end]
    if start >= plen and end == plen + num_output:  # the newest tokens
        return cons_tuple(output, end - start)
    tail = cons_tuple(output, num_output - max(start - plen, 0))
    tail = tail[: end - max(start, plen)]
    return prompt[start:plen] + tail if start < plen else tail


# -- sampling parameters --------------------------------------------------------


def _to_tuple(value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


class RequestOutputKind(enum.IntEnum):
    """vLLM's: what each ``step`` reports for a request. CUMULATIVE: the whole
    output so far, every step that touched it; DELTA: only what is new since
    the last report; FINAL_ONLY: one output, when it finishes (``LLM.generate``)."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


def _output_kind(value: Any) -> RequestOutputKind:
    """A RequestOutputKind, or its value (as a trace stores it)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        return RequestOutputKind(value)
    except ValueError:
        raise ValueError(f"output_kind must be a RequestOutputKind, got {value!r}") from None


def _schema_text(value: Any) -> Any:
    """A JSON schema given as a dict becomes its JSON text (key order kept)."""
    if isinstance(value, dict):
        try:
            return json.dumps(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"guided_decoding json schema is not JSON-serialisable: {e}") from None
    return value


def _choice_tuple(value: Any) -> Any:
    return None if value is None or isinstance(value, str) else tuple(value)


GUIDED_OPTIONS = ("json", "regex", "choice", "grammar", "json_object")


@attrs.frozen(kw_only=True)
class GuidedDecodingParams:
    """vLLM's structured-output request: exactly one of ``json`` (a JSON
    schema, dict or text), ``regex``, ``choice`` (a list of strings),
    ``grammar`` (xgrammar's EBNF) or ``json_object=True`` (any JSON object).

    Pure data: the shape is checked here; whether the schema, regex or
    grammar compiles is checked when the request is added (the shell's
    :mod:`fnllm.guided`, with xgrammar). ``backend`` may be None, "auto" or
    "xgrammar"; ``disable_any_whitespace`` makes JSON compact.
    """

    json: str | None = attrs.field(default=None, converter=_schema_text)
    regex: str | None = None
    choice: tuple[str, ...] | None = attrs.field(default=None, converter=_choice_tuple)
    grammar: str | None = None
    json_object: bool | None = None
    backend: str | None = None
    disable_any_whitespace: bool = False

    def __attrs_post_init__(self) -> None:
        given = [k for k in GUIDED_OPTIONS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "guided_decoding needs exactly one of json, regex, choice, grammar or json_object, "
                f"got {', '.join(given) if given else 'none'}"
            )
        for name in ("json", "regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"guided_decoding {name} must be a non-empty string, got {v!r}")
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError(f"guided_decoding choice must be a non-empty list of non-empty strings, got {self.choice!r}")
        if self.json_object not in (None, True, False):
            raise ValueError(f"guided_decoding json_object must be a bool, got {self.json_object!r}")
        if self.backend not in (None, "auto", "xgrammar"):
            raise ValueError(f"guided_decoding backend {self.backend!r} is not available (only 'xgrammar')")

    @property
    def kind(self) -> str:
        return next(k for k in GUIDED_OPTIONS if getattr(self, k) not in (None, False))


def _guided(value: Any) -> Any:
    if isinstance(value, dict):
        return GuidedDecodingParams(**value)  # e.g. from a trace's JSON
    return value


def _token_id(name: str, value: Any) -> int:
    """A token id from an int or a string of one (OpenAI's logit_bias keys); ValueError naming ``name``."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{name} keys must be token ids (integers), got {value!r}") from None
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must hold token ids (integers), got {value!r}")
    value = value.__index__()
    if value < 0:
        raise ValueError(f"{name} holds a negative token id {value}")
    return value


def _to_bias(value: Any) -> Map:
    """``logit_bias`` as an immutable ``{token_id: bias}`` (dict, pairs, or string keys)."""
    if value is None:
        return EMPTY_MAP
    if isinstance(value, Map):
        return value
    items = value.items() if hasattr(value, "items") else value
    out = {}
    try:
        for k, v in items:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"logit_bias values must be finite numbers, got {v!r} for token {k!r}")
            out[_token_id("logit_bias", k)] = float(v)
    except TypeError:
        raise ValueError(f"logit_bias must be a dict from token id to bias, got {value!r}") from None
    return Map(out)


def _to_allowed(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"allowed_token_ids must be a list of token ids, got {value!r}")
    return tuple(_token_id("allowed_token_ids", t) for t in value)


def _to_words(value: Any) -> tuple[tuple[int, ...], ...]:
    if value is None:
        return ()
    try:
        return tuple(tuple(_token_id("bad_words_token_ids", t) for t in w) for w in value)
    except TypeError:
        raise ValueError(f"bad_words_token_ids must be a list of token id lists, got {value!r}") from None


def _check_float(name: str, value: Any, low: float, high: float) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value > high or value < low:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")


@attrs.frozen(kw_only=True)
class SamplingParams:
    """vLLM's sampling parameters, validated on construction.

    ``top_k`` of -1 or 0 and ``top_p`` of 1 switch those filters off;
    ``temperature`` 0 is greedy. ``seed`` makes the request's random stream a
    function of (seed, sample index, output position) only.

    Logits processing, vLLM's semantics and order (all off by default):
    ``allowed_token_ids`` keeps only those ids; ``bad_words`` (strings) bans
    each word's last token where its other tokens end the output so far (the
    engine tokenizes them at add time, with and without a leading space, into
    ``bad_words_token_ids``, which can also be given directly); ``logit_bias``
    adds a bias per token id; then ``repetition_penalty`` (> 0: divides the
    positive and multiplies the negative logits of every token in the prompt
    or output), ``frequency_penalty`` (subtracts penalty x count in the output)
    and ``presence_penalty`` (subtracts it once per token seen in the output),
    both in [-2, 2]. ``prompt_logprobs``: the logprob of every prompt token
    (and the top ones) but the first; ``truncate_prompt_tokens``: keep only the
    prompt's last k tokens. Token ids are checked against the vocabulary when
    the request is added.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = attrs.field(default=(), converter=_to_tuple)
    stop_token_ids: tuple[int, ...] = attrs.field(default=(), converter=_to_tuple)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    output_kind: RequestOutputKind = attrs.field(default=RequestOutputKind.CUMULATIVE, converter=_output_kind)
    guided_decoding: GuidedDecodingParams | None = attrs.field(default=None, converter=_guided)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Map = attrs.field(default=None, converter=_to_bias)
    allowed_token_ids: tuple[int, ...] | None = attrs.field(default=None, converter=_to_allowed)
    bad_words: tuple[str, ...] = attrs.field(default=(), converter=_to_tuple)
    bad_words_token_ids: tuple[tuple[int, ...], ...] = attrs.field(default=(), converter=_to_words)
    prompt_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    # derived (not an argument): sampling reads the sequence's tokens (penalties, bad words)
    needs_history: bool = attrs.field(init=False, default=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        _check_int("n", self.n, 1)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        _check_int("top_k", self.top_k, -1)
        m = self.min_p
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not (0 <= m <= 1):
            raise ValueError(f"min_p must be in [0, 1], got {m!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
            if self.seed >= 2**64:
                raise ValueError(f"seed must be < 2**64, got {self.seed!r}")
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
        for i in self.stop_token_ids:
            _check_int("stop_token_ids entry", i, 0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0)
        if self.guided_decoding is not None and not isinstance(self.guided_decoding, GuidedDecodingParams):
            raise ValueError(f"guided_decoding must be a GuidedDecodingParams, got {type(self.guided_decoding).__name__}")
        self._check_processing()

    def _check_processing(self) -> None:
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        r = self.repetition_penalty
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {r!r}")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must hold at least one token id (or be None)")
        for w in self.bad_words:
            if not isinstance(w, str) or not w.strip():
                raise ValueError(f"bad_words must hold non-empty strings, got {w!r}")
        for w in self.bad_words_token_ids:
            if not w:
                raise ValueError("bad_words_token_ids must hold non-empty token id lists")
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, 0)
        if self.truncate_prompt_tokens is not None:
            _check_int("truncate_prompt_tokens", self.truncate_prompt_tokens, 1)
        object.__setattr__(self, "needs_history", bool(self.bad_words_token_ids) or self.needs_counts)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_counts(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def processes_logits(self) -> bool:
        """Whether the device changes this row's logits before sampling."""
        return self.needs_history or bool(self.logit_bias) or self.allowed_token_ids is not None


# -- requests and sequences ----------------------------------------------------------


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    PREEMPTED = "preempted"  # by recompute: its KV dropped
    SWAPPED = "swapped"  # by swap: its KV in host blocks
    RUNNING = "running"


@attrs.frozen(kw_only=True)
class Request:
    """What a user asked for. ``arrival`` is the order of admission to the
    engine (assigned by ``add_request``), the FCFS key and the tie-break."""

    request_id: str
    prompt_token_ids: tuple[int, ...] = attrs.field(converter=tuple)
    sampling: SamplingParams = attrs.field(factory=SamplingParams)
    priority: int = 0
    arrival: int = -1
    extra_keys: tuple = ()
    # chained hashes of the prompt's full blocks (set by add_request when
    # prefix caching is on)
    block_hashes: tuple[bytes, ...] = ()


@slot_init
@attrs.frozen(kw_only=True)
class Seq:
    """A sequence not running: waiting for first admission, preempted by
    recompute (its KV dropped, its output kept; it recomputes on
    readmission), or swapped (``swapped`` holds the host blocks with the KV
    of its first ``num_computed`` tokens; they come back on readmission)."""

    seq_id: int
    request_id: str
    index: int = 0
    status: SeqStatus = SeqStatus.WAITING
    output: Cons = None
    num_output: int = 0
    hashes: tuple[bytes, ...] = ()  # hash chain of its full token blocks, as far as known
    num_computed: int = 0  # tokens whose KV is in ``swapped`` (SWAPPED only)
    swapped: tuple[int, ...] = ()  # host block table (SWAPPED only)


@slot_init
@attrs.frozen
class Running:
    """The running sequences as columns; row ``i`` of every tuple is one
    sequence, rows in scheduling (admission) order.

    ``num_computed[i]`` counts tokens whose KV is in the cache (or is being
    written by the step already planned); ``tables[i]`` holds exactly
    ceil(num_computed / block_size) entries, of which a leading run may be
    :data:`HOLE` (sliding window: blocks released outside the window);
    ``hashes[i]`` is the chain of block hashes of the sequence's full
    computed blocks.
    """

    seq_ids: tuple[int, ...] = ()
    request_ids: tuple[str, ...] = ()
    indexes: tuple[int, ...] = ()
    sampling: tuple[SamplingParams, ...] = ()  # the request's, for the hot path
    num_computed: tuple[int, ...] = ()
    num_tokens: tuple[int, ...] = ()  # prompt + output
    num_output: tuple[int, ...] = ()
    outputs: tuple[Cons, ...] = ()
    tables: tuple[tuple[int, ...], ...] = ()
    hashes: tuple[tuple[bytes, ...], ...] = ()

    def __len__(self) -> int:
        return len(self.seq_ids)


COLUMNS = tuple(a.name for a in attrs.fields(Running))
# columns that change only when rows are added or removed
_ROW_COLUMNS = frozenset({"seq_ids", "request_ids", "indexes", "sampling"})


def running_from(cols: dict, live: list, old: Running) -> Running:
    """Freeze a step's working columns (``cols[name]``, a list per column;
    ``live[i]`` False for removed rows). When no row was added or removed, the
    row columns keep ``old``'s tuples (the same objects: memos keyed by them
    stay valid); otherwise the new sampling column's traits are derived from
    ``old``'s (:func:`fnllm.derived.note_traits_after`)."""
    every = all(live)
    if every and len(live) == len(old):
        return Running(*[getattr(old, k) if k in _ROW_COLUMNS else tuple(cols[k]) for k in COLUMNS])
    if every:
        new = Running(*[tuple(cols[k]) for k in COLUMNS])
    elif live.count(False) == 1:  # one row ends (the usual step that ends any): two slices per column
        i = live.index(False)
        new = Running(*[tuple(cols[k][:i]) + tuple(cols[k][i + 1 :]) for k in COLUMNS])
    else:
        new = Running(*[tuple(compress(cols[k], live)) for k in COLUMNS])
    note_traits_after(old.sampling, new.sampling, live)
    return new


# -- the block pool ----------------------------------------------------------------

POOL_MAPS = ("ref", "lru_next", "lru_prev", "hash_of", "by_hash", "content")
REF, LRU_NEXT, LRU_PREV, HASH_OF, BY_HASH, CONTENT = range(len(POOL_MAPS))


@attrs.frozen(kw_only=True)
class BlockPool:
    """``num_blocks`` KV blocks. A block is referenced (``ref[b] > 0``) or free;
    free blocks are either never cached (``free_stack`` plus the untouched
    range ``[fresh, num_blocks)``) or cached and evictable, in least recently
    used order in the persistent linked list ``lru_*``.

    Tiers: the device pool's ``host`` is a second pool of the same shape
    (``host.host`` is None) holding host blocks: the KV of swapped sequences
    (referenced) and, with the host prefix cache, offloaded cached blocks
    (free, cached, in its own LRU). Block ids are per tier; a plan moves
    content between tiers with ``swap_out``/``swap_in``. A hash is cached in
    at most one tier.
    """

    num_blocks: int
    block_size: int
    free_stack: Cons = None  # uncached free blocks
    num_stack: int = 0
    fresh: int = 0  # blocks >= fresh have never been allocated
    lru_head: int = -1
    lru_tail: int = -1
    num_lru: int = 0
    host: Optional["BlockPool"] = None
    # the per-block maps, one persistent version (fnllm/pmaps.py): O(1) reads
    # and updates whatever the pool's size; read through the properties below
    maps: Version = attrs.field(factory=lambda: new_store(len(POOL_MAPS)))

    ref = property(lambda self: View(self.maps, REF), doc="block -> reference count (> 0)")
    lru_next = property(lambda self: View(self.maps, LRU_NEXT), doc="cached free block -> the next in LRU order")
    lru_prev = property(lambda self: View(self.maps, LRU_PREV), doc="cached free block -> the previous in LRU order")
    hash_of = property(lambda self: View(self.maps, HASH_OF), doc="cached block -> its chained hash")
    by_hash = property(lambda self: View(self.maps, BY_HASH), doc="chained hash -> cached block")
    content = property(
        lambda self: View(self.maps, CONTENT), doc="cached block -> (parent hash, tokens, extra), for invariant 5"
    )

    @property
    def num_free(self) -> int:
        return self.num_stack + (self.num_blocks - self.fresh) + self.num_lru


# -- engine state ----------------------------------------------------------------


@attrs.frozen(kw_only=True)
class EngineState:
    """Everything the engine knows, as one immutable value.

    ``requests`` holds live requests only (waiting or running);
    ``alive[request_id]`` counts that request's live sequences. Finished and
    aborted requests leave the state entirely.
    """

    pool: BlockPool
    requests: Map = EMPTY_MAP
    alive: Map = EMPTY_MAP
    waiting: tuple[Seq, ...] = ()
    running: Running = attrs.field(factory=Running)
    next_seq_id: int = 0
    next_arrival: int = 0
    step: int = 0
    # counters for metrics (never read by a decision): preemptions (either
    # mode), and prefix-cache lookups in tokens queried and tokens found
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # speculative decoding (never read by a decision): rows that carried
    # drafts, draft tokens verified, draft tokens accepted
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0


# -- plan and device output --------------------------------------------------------------


_GUIDED = operator.attrgetter("guided_decoding")


def guided_outputs(sampling, outputs, num_output) -> tuple:
    """The plan's ``guided_outputs`` column: () when no row is guided (the
    common case, one scan), else per row the row's output or None."""
    if not any(map(_GUIDED, sampling)):  # attrgetter: a C-level scan
        return ()
    return tuple(
        OutputIds(o, k) if sp.guided_decoding is not None else None
        for sp, o, k in zip(sampling, outputs, num_output)
    )


@slot_init
@attrs.frozen(kw_only=True)
class BatchPlan:
    """One step's work, complete plain data, row ``i`` per scheduled sequence.

    Row ``i`` computes KV for ``token_ids[i]`` at positions
    ``positions[i] .. positions[i] + len(token_ids[i]) - 1`` into the blocks of
    ``block_tables[i]`` (the full table), and then draws ``num_samples[i]``
    tokens from the logits of its last position (0 for a prompt chunk that is
    not the last; ``n`` on the step that forks a request into ``n`` samples).
    The random stream of sample ``j`` of row ``i`` is a function of
    ``(sampling[i].seed, sample_index[i] + j, output_pos[i])`` only.
    With a sliding window, a table's leading entries may be :data:`HOLE`;
    a row never reads them (its queries attend only to positions from
    ``positions[i] - sliding_window + 1`` on).
    ``copies`` are (src, dst) block copies the device makes before the forward.
    ``swap_out`` are (device, host) and ``swap_in`` (host, device) block
    moves between tiers. The device runs them in the order swap_out,
    swap_in, copies, forward; the core guarantees that no host block is both
    a swap_in source and a swap_out target of one plan, and that every
    device block a row reads is on the device by then.

    Logits processing reads only plan data: ``history[i]`` is, for a row that
    samples with penalties or bad words, ``(prompt ids, output ids so far)``
    (the output as :class:`OutputIds`; the prompt part empty unless
    ``repetition_penalty`` needs it), and ``()`` for every other row;
    ``prompt_targets[i]`` is, for a prefill row of a request with
    ``prompt_logprobs``, the prompt tokens at positions ``positions[i] + 1 ..``
    (as many as its chunk predicts), whose logprobs the device returns.
    Either column is ``()`` when no row needs it.
    """

    step: int
    seq_ids: tuple[int, ...] = ()
    request_ids: tuple[str, ...] = ()
    token_ids: tuple[tuple[int, ...], ...] = ()
    positions: tuple[int, ...] = ()
    block_tables: tuple[tuple[int, ...], ...] = ()
    num_samples: tuple[int, ...] = ()
    sample_index: tuple[int, ...] = ()
    output_pos: tuple[int, ...] = ()
    sampling: tuple[SamplingParams, ...] = ()
    copies: tuple[tuple[int, int], ...] = ()
    swap_out: tuple[tuple[int, int], ...] = ()
    swap_in: tuple[tuple[int, int], ...] = ()
    idle_reason: str = ""
    # speculative decoding (:mod:`fnllm.spec`): the last ``num_draft_tokens[i]``
    # of row ``i``'s tokens are drafts, and the device samples one token at
    # each of the row's last ``num_draft_tokens[i] + 1`` positions (the one at
    # offset ``j`` with output position ``output_pos[i] + j``). Empty: no drafts.
    num_draft_tokens: tuple[int, ...] = ()
    # per row, the output so far of a row with guided decoding (None for the
    # others); () when no row is guided. The device rebuilds its grammar
    # state from it, so preemption, forks and replay stay exact.
    guided_outputs: tuple[OutputIds | None, ...] = ()
    history: tuple[tuple, ...] = ()
    prompt_targets: tuple[tuple[int, ...], ...] = ()

    def __len__(self) -> int:
        return len(self.seq_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def has_device_work(self) -> bool:
        """Rows to run, or blocks to copy or move: a plan with none needs no device call."""
        return bool(self.seq_ids or self.copies or self.swap_out or self.swap_in)


# A sampled token's logprobs: ((sampled_id, logprob), (top1_id, lp), ...).
TokenLogprobs = tuple[tuple[int, float], ...]
# A prompt token's: (its rank, ((token_id, logprob), (top1_id, lp), ...)).
PromptLogprob = tuple[int, TokenLogprobs]


@slot_init
@attrs.frozen(kw_only=True)
class StepOutput:
    """What the device returns for a plan: for each plan row, the tuple of
    ``num_samples[i]`` sampled token ids (``1 + num_draft_tokens[i]`` on a
    row with drafts, in position order), and optionally their logprobs;
    ``prompt_logprobs[i]`` one :data:`PromptLogprob` per ``plan.prompt_targets[i]``
    (None when the plan asked for none)."""

    sampled: tuple[tuple[int, ...], ...] = ()
    logprobs: tuple[tuple[TokenLogprobs, ...], ...] | None = None
    prompt_logprobs: tuple[tuple[PromptLogprob, ...], ...] | None = None


class Executor(Protocol):
    """The device contract: run a plan (its swaps and copies first, then one
    forward) and return what it sampled. Keeps no per-request state beyond
    KV blocks (device and host tiers)."""

    def execute(self, plan: BatchPlan) -> StepOutput: ...


@attrs.frozen(kw_only=True)
class SeqOutput:
    """One sequence's news from a committed step."""

    request_id: str
    index: int
    seq_id: int
    new_token_ids: tuple[int, ...]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    logprobs: tuple[TokenLogprobs, ...] | None = None
    request_finished: bool = False


@slot_init
@attrs.frozen
class Outputs:
    """A committed step's news as columns, one entry per sampled token
    (a sequence gets one token per step); iterate for :class:`SeqOutput`
    records. ``finished_requests`` lists requests whose last sequence ended."""

    request_ids: tuple[str, ...] = ()
    indexes: tuple[int, ...] = ()
    seq_ids: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()
    finish_reasons: tuple[str | None, ...] = ()
    stop_reasons: tuple[int | str | None, ...] = ()
    logprobs: tuple[TokenLogprobs | None, ...] | None = None
    finished_requests: tuple[str, ...] = ()
    # speculative decoding: (request_id, index, draft tokens, accepted) per row that carried drafts
    spec: tuple[tuple[str, int, int, int], ...] = ()

    def __len__(self) -> int:
        return len(self.seq_ids)

    def __iter__(self):
        done = set(self.finished_requests)
        lps = self.logprobs
        for k in range(len(self.seq_ids)):
            rid, reason = self.request_ids[k], self.finish_reasons[k]
            yield SeqOutput(
                request_id=rid,
                index=self.indexes[k],
                seq_id=self.seq_ids[k],
                new_token_ids=(self.token_ids[k],),
                finish_reason=reason,
                stop_reason=self.stop_reasons[k],
                logprobs=None if lps is None or lps[k] is None else (lps[k],),
                request_finished=reason is not None and rid in done and self._last_of(rid, k),
            )

    def _last_of(self, rid: str, k: int) -> bool:
        """True for the final ending entry of ``rid`` in this step."""
        return all(
            self.request_ids[j] != rid or self.finish_reasons[j] is None for j in range(k + 1, len(self.seq_ids))
        )


@attrs.frozen(kw_only=True)
class Rejection:
    """An add that cannot be served, as a value (not an exception)."""

    request_id: str
    reason: str
