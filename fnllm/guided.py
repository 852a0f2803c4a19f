"""Structured outputs with xgrammar: grammars compiled for one vocabulary.

The shell's half of guided decoding (the device's half is
:mod:`fnllm.device.guided`). :func:`grammar_compiler` gives one
:class:`GuidedCompiler` per (tokenizer, logits width) per process, so the
engine (which validates at add time) and an executor in the same process
share their compiled grammars. xgrammar is imported lazily, only when a
request asks for guided decoding; without it that request gets a clear
error and nothing else changes.

Invariants:

* ``compile(params)`` is a function of ``params`` (cached, bounded): equal
  params give the same compiled grammar.
* The token bitmask is as wide as the logits (``vocab_size``, the model's
  width, which may exceed the tokenizer's: padding ids are never allowed).
* Stop tokens are the tokenizer's EOS ids: a complete grammar allows only
  them, so a finished grammar ends the request.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict

from fnllm.state import GuidedDecodingParams

MAX_CACHED_GRAMMARS = 256

INSTALL_HINT = (
    "guided decoding needs xgrammar, which is not installed: scripts/setup.sh installs it "
    "(pip install --no-deps 'xgrammar>=0.2,<0.3' apache-tvm-ffi, after torch)"
)


def import_xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise ValueError(f"{INSTALL_HINT} ({e})") from None
    return xgrammar


def choice_grammar(choices) -> str:
    """An EBNF grammar matching exactly one of ``choices`` (JSON string escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def tokenizer_info(tokenizer, vocab_size: int):
    """xgrammar's view of ``tokenizer`` for logits ``vocab_size`` wide."""
    xgr = import_xgrammar()
    backend = tokenizer._backend
    stops = list(tokenizer.eos_token_ids)
    as_transformers = getattr(backend, "transformers_tokenizer", None)
    if as_transformers is not None:
        return xgr.TokenizerInfo.from_huggingface(as_transformers(), vocab_size=vocab_size, stop_token_ids=stops)
    sp = getattr(backend, "sp", None)
    if sp is None:
        raise ValueError(f"guided decoding does not support the tokenizer {tokenizer!r}")
    vocab = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    for text, i in backend.added.items():  # added tokens beyond the SentencePiece model
        vocab.extend([""] * (i + 1 - len(vocab)))
        vocab[i] = text
    return xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.BYTE_FALLBACK, vocab_size=vocab_size,
                             stop_token_ids=stops, add_prefix_space=True)


class GuidedCompiler:
    """Compiles :class:`GuidedDecodingParams` into xgrammar grammars (thread-safe, cached)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.xgr = import_xgrammar()
        self.info = tokenizer_info(tokenizer, vocab_size)
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(self.info.stop_token_ids)
        self._compiler = self.xgr.GrammarCompiler(self.info, max_threads=1)
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, params: GuidedDecodingParams):
        """The compiled grammar; ``ValueError`` naming the option when it does not compile."""
        with self._lock:
            got = self._cache.get(params)
            if got is not None:
                self._cache.move_to_end(params)
                return got
        got = self._compile(params)
        with self._lock:
            self._cache[params] = got
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return got

    def _compile(self, p: GuidedDecodingParams):
        c, kind = self._compiler, p.kind
        try:
            if kind == "json":
                json.loads(p.json)  # a clearer message than the compiler's for text that is not JSON
                return c.compile_json_schema(p.json, any_whitespace=not p.disable_any_whitespace)
            if kind == "json_object":
                return c.compile_builtin_json_grammar()
            if kind == "regex":
                return c.compile_regex(p.regex)
            if kind == "choice":
                return c.compile_grammar(choice_grammar(p.choice))
            return c.compile_grammar(p.grammar)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"guided_decoding {kind} is invalid: {_short(e)}") from None

    def matcher(self, params: GuidedDecodingParams):
        return self.xgr.GrammarMatcher(self.compile(params))


def _short(e: Exception) -> str:
    """xgrammar's message without its C++ source prefix."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "] /" in text and ": " in text:
        text = text.split(": ", 1)[1] if text.startswith("[") else text
    return text


_compilers: dict = {}
_compilers_lock = threading.Lock()


def grammar_compiler(tokenizer, vocab_size: int) -> GuidedCompiler:
    """The process's compiler for ``tokenizer`` at logits width ``vocab_size``."""
    key = (id(tokenizer), getattr(tokenizer, "source", None), vocab_size)
    with _compilers_lock:
        got = _compilers.get(key)
        if got is None or got[0] is not tokenizer:
            got = _compilers[key] = (tokenizer, GuidedCompiler(tokenizer, vocab_size))
        return got[1]


@functools.lru_cache(maxsize=4)
def compiler_for_model(model_path: str, vocab_size: int) -> GuidedCompiler:
    """The compiler for a checkpoint's own tokenizer (what an executor uses)."""
    from fnllm.tokenizer import load_tokenizer

    return grammar_compiler(load_tokenizer(model_path), vocab_size)
