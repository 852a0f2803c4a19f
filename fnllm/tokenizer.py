"""Tokenizers, chat templates, incremental detokenization and stop strings.

``load_tokenizer(path)`` accepts a Hugging Face directory (``tokenizer.json``
via transformers, else a SentencePiece ``tokenizer.model`` such as Pangu's via
sentencepiece; a checkpoint's custom tokenizer code is never executed), a
``.gguf`` file (via transformers' GGUF reader), or a directory holding exactly
one ``.gguf`` file. Results are cached per resolved path within the process.

Invariants:

* ``decode`` never applies ``clean_up_tokenization_spaces``: it is the exact
  text of the ids (special tokens skipped by default).
* ``eos_token_ids`` lists the primary EOS id first, then every other id the
  checkpoint declares as EOS (tokenizer, ``config.json``,
  ``generation_config.json``); for GGUF files also the special tokens that
  llama.cpp treats as end-of-generation by name (``<|endoftext|>``,
  ``<|im_end|>``, ...). SmolLM2's GGUF gives ``(2, 0)``:
  ``<|im_end|>`` then ``<|endoftext|>``.
* Chat templates are the checkpoint's own; a Pangu checkpoint without one gets
  the Pangu format (see ``render_pangu_chat``); anything else is a ValueError.
* ``IncrementalDetokenizer``: the deltas returned by ``push`` never end in a
  partial UTF-8 character (U+FFFD tail is held back), and
  ``"".join(deltas) + finish() == decode(all_ids)``.
* Stop strings: ``find_stop`` searches only the tail that new text can affect.
  Streaming holds back only the longest suffix that is a proper prefix of a
  stop string (``stream_safe_len``), which is tighter than vLLM v1's fixed
  ``max_stop_len - 1`` buffer and never emits text a later stop would cut.
  The final text is cut at the stop string, which is excluded unless
  ``include_stop_str_in_output``.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

REPLACEMENT_CHAR = "\ufffd"

# Special tokens llama.cpp treats as end-of-generation by their text (llama-vocab.cpp).
_EOG_TOKEN_TEXTS = frozenset(
    {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>", "<EOT>"}
)
_PANGU_ARCHITECTURES = frozenset({"PanguEmbeddedForCausalLM"})
_PANGU_MODEL_TYPES = frozenset({"PanguEmbedded", "pangu_embedded"})
_PANGU_ROLES = {"system": "系统", "user": "用户", "assistant": "助手", "tool": "工具", "function": "方法"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_FNLLM_TOKENIZER = "fnllm_tokenizer.json"  # a converted GGUF copy's extra tokenizer facts (fnllm.model.gguf_cache)


# --------------------------------------------------------------------------- backends


class _HFBackend:
    """A transformers tokenizer (fast / tokenizers-backed)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.bos_token_id: int | None = tok.bos_token_id
        self.eos_token_id: int | None = tok.eos_token_id
        self.vocab_size: int = len(tok)
        template = getattr(tok, "chat_template", None)
        self.chat_template: str | None = template.get("default") if isinstance(template, dict) else template
        self.special_tokens: dict[str, str] = {
            k: str(v) for k, v in tok.special_tokens_map.items() if isinstance(v, str)
        }
        self.added_special: dict[str, int] = {
            str(t): i for i, t in tok.added_tokens_decoder.items() if getattr(t, "special", False)
        }

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(
            list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def transformers_tokenizer(self):
        """The transformers tokenizer itself (for libraries that want one, e.g. xgrammar)."""
        return self.tok


class _TokenizersBackend:
    """``tokenizer.json`` read by the ``tokenizers`` library alone (no transformers
    import: about a second less start-up), for a directory that transformers
    itself wrote, such as a converted GGUF copy: its ``tokenizer.json`` already
    holds the post-processor, and ``tokenizer_config.json`` names the special
    tokens. Encodes and decodes exactly as :class:`_HFBackend` over the same
    files (tested)."""

    def __init__(self, directory: Path, cfg: dict[str, Any]) -> None:
        from tokenizers import Tokenizer as _Tok

        self.tok = _Tok.from_file(str(directory / "tokenizer.json"))
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {
            key: content for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (content := _token_content(cfg.get(key))) is not None
        }
        self.bos_token_id = self._id(self.special_tokens.get("bos_token"))
        self.eos_token_id = self._id(self.special_tokens.get("eos_token"))
        self.added_special = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        self.chat_template = _template_from_config(cfg, directory)

    def _id(self, content: str | None) -> int | None:
        return None if content is None else self.tok.token_to_id(content)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def transformers_tokenizer(self):
        """The same ``tokenizer.json`` as a transformers tokenizer (imports
        transformers: only for libraries that want one, e.g. xgrammar)."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=self.tok)


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class _SentencePieceBackend:
    """A SentencePiece ``tokenizer.model`` plus ``tokenizer_config.json``, decoded the way
    Pangu's (and Llama's legacy) slow tokenizer does: text between added tokens is
    SentencePiece-encoded chunk by chunk; added tokens decode verbatim."""

    def __init__(self, model_file: Path, cfg: dict[str, Any]) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        added = {int(i): d for i, d in (cfg.get("added_tokens_decoder") or {}).items()}
        self.added: dict[str, int] = {d["content"]: i for i, d in added.items()}
        self.added_special = {d["content"]: i for i, d in added.items() if d.get("special", False)}
        self.special_tokens: dict[str, str] = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            content = _token_content(cfg.get(key))
            if content is not None:
                self.special_tokens[key] = content
                self.added_special.setdefault(content, self._piece_id(content))
        self.bos_token_id = self._special_id("bos_token", self.sp.bos_id())
        self.eos_token_id = self._special_id("eos_token", self.sp.eos_id())
        self.add_bos = bool(cfg.get("add_bos_token", True)) and self.bos_token_id is not None
        self.vocab_size = max([self.sp.get_piece_size(), *(i + 1 for i in added)])
        self.chat_template = _template_from_config(cfg, model_file.parent)
        names = sorted(self.added, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        self._id_to_added = {i: s for s, i in self.added.items()}
        self._skip_ids = frozenset(self.added_special.values())

    def _piece_id(self, content: str) -> int:
        return self.added.get(content, self.sp.piece_to_id(content))

    def _special_id(self, key: str, default: int) -> int | None:
        content = self.special_tokens.get(key)
        found = self._piece_id(content) if content is not None else default
        return found if found is not None and found >= 0 else None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = [self.bos_token_id] if add_special_tokens and self.add_bos else []  # type: ignore[list-item]
        chunks = self._split_re.split(text) if self._split_re else [text]
        for chunk in chunks:
            if chunk in self.added:
                ids.append(self.added[chunk])
            elif chunk:
                ids.extend(self.sp.encode(chunk))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if skip_special_tokens and i in self._skip_ids:
                continue
            if i in self._id_to_added:
                parts.append(self.sp.decode(run) if run else "")
                parts.append(self._id_to_added[i])
                run = []
            else:
                run.append(int(i))
        parts.append(self.sp.decode(run) if run else "")
        return "".join(parts)


# --------------------------------------------------------------------------- chat templates


def _template_from_config(cfg: dict[str, Any], directory: Path) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def render_pangu_chat(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """Pangu's chat format: ``[unused9]<role>：<content>[unused10]`` per turn, an empty
    system turn first when none is given (as openPangu's own template does), and
    ``[unused9]助手：`` as the generation prompt."""
    out: list[str] = []
    if not messages or messages[0].get("role") != "system":
        out.append("[unused9]系统：[unused10]")
    for message in messages:
        role = message.get("role")
        if role not in _PANGU_ROLES:
            raise ValueError(f"Pangu chat format has no role {role!r} (known: {sorted(_PANGU_ROLES)})")
        out.append(f"[unused9]{_PANGU_ROLES[role]}：{_message_text(message.get('content'))}[unused10]")
    if add_generation_prompt:
        out.append("[unused9]助手：")
    return "".join(out)


def _render_jinja(template: str, messages: Sequence[dict[str, Any]], add_generation_prompt: bool, **extra: Any) -> str:
    """Render with transformers' sandboxed chat-template renderer (same semantics as
    ``tokenizer.apply_chat_template(tokenize=False)``)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[list(messages)], chat_template=template, add_generation_prompt=add_generation_prompt, **extra
    )
    return rendered[0]


# --------------------------------------------------------------------------- Tokenizer


class Tokenizer:
    """Model-facing tokenizer: ids in, text out, plus EOS ids and the chat format."""

    def __init__(self, backend: Any, eos_token_ids: Sequence[int], is_pangu: bool, source: str) -> None:
        self._backend = backend
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.bos_token_id: int | None = backend.bos_token_id
        self.vocab_size: int = backend.vocab_size
        self.chat_template: str | None = backend.chat_template
        self.is_pangu = is_pangu
        self.source = source

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, eos={self.eos_token_ids})"

    def save_pretrained(self, directory) -> None:
        """Write the tokenizer files (transformers' format) into ``directory``."""
        if not isinstance(self._backend, _HFBackend):
            raise ValueError(f"{self.source}: only a transformers tokenizer can be saved")
        self._backend.tok.save_pretrained(str(directory))

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` in the checkpoint's own chat format."""
        if self.chat_template is not None:
            return _render_jinja(
                self.chat_template, messages, add_generation_prompt, **self._backend.special_tokens
            )
        if self.is_pangu:
            return render_pangu_chat(messages, add_generation_prompt)
        raise ValueError(f"{self.source}: the checkpoint has no chat template and is not a Pangu model")

    def apply_chat_template_ids(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of ``apply_chat_template`` (the template supplies any BOS itself)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


# --------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _as_ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def _is_pangu(config: dict[str, Any]) -> bool:
    archs = config.get("architectures") or []
    return bool(_PANGU_ARCHITECTURES.intersection(archs)) or config.get("model_type") in _PANGU_MODEL_TYPES


def _load_hf_directory(directory: Path) -> Any:
    """``tokenizer.json`` through transformers (AutoTokenizer, or the plain fast class
    when the checkpoint names custom code, which is never run); otherwise
    ``tokenizer.model`` through SentencePiece directly (legacy Llama / Pangu
    semantics; transformers' conversion would need protobuf and could differ)."""
    cfg = _read_json(directory / "tokenizer_config.json")
    if not (directory / "tokenizer.json").is_file():
        return _SentencePieceBackend(directory / "tokenizer.model", cfg)
    if (directory / _FNLLM_TOKENIZER).is_file() and os.environ.get("FNLLM_FAST_TOKENIZER", "1") != "0":
        return _TokenizersBackend(directory, cfg)  # written by fnllm through transformers: no transformers import
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if "AutoTokenizer" in (cfg.get("auto_map") or {}):  # custom tokenizer class
        return _HFBackend(PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True))
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception:  # e.g. an unknown model_type in config.json
        tok = PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    return _HFBackend(tok)


def _gguf_eog_ids(backend: _HFBackend) -> list[int]:
    return [i for text, i in backend.added_special.items() if text in _EOG_TOKEN_TEXTS]


def _load_gguf(path: Path) -> Tokenizer:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    backend = _HFBackend(tok)
    eos = [*_as_ids(backend.eos_token_id), *sorted(_gguf_eog_ids(backend))]
    return Tokenizer(backend, eos, is_pangu=False, source=str(path))


def _load_directory(directory: Path) -> Tokenizer:
    backend = _load_hf_directory(directory)
    config = _read_json(directory / "config.json")
    generation = _read_json(directory / "generation_config.json")
    eos = [
        *_as_ids(backend.eos_token_id),
        *_as_ids(generation.get("eos_token_id")),
        *_as_ids(config.get("eos_token_id")),
        *_as_ids(_read_json(directory / _FNLLM_TOKENIZER).get("eos_token_ids")),  # a converted GGUF's
    ]
    return Tokenizer(backend, eos, is_pangu=_is_pangu(config), source=str(directory))


def _gguf_or_copy(path: Path) -> Path:
    """A GGUF's converted copy when there is one (it reads in milliseconds), else the GGUF."""
    from fnllm.model.gguf_cache import converted_dir

    return converted_dir(path) or path


def _resolve(path: Path) -> Path:
    """The .gguf file or tokenizer directory that ``path`` names; ValueError if none."""
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_or_copy(path)
    if path.is_file() and path.name in _TOKENIZER_FILES:
        return path.parent
    if path.is_dir():
        if any((path / name).is_file() for name in _TOKENIZER_FILES):
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_or_copy(ggufs[0])
    raise ValueError(
        f"no tokenizer found at {path}: looked for a .gguf file, or a directory holding "
        f"{' or '.join(_TOKENIZER_FILES)} (or exactly one .gguf file)"
    )


@functools.lru_cache(maxsize=8)
def _load_cached(resolved: str) -> Tokenizer:
    path = Path(resolved)
    return _load_gguf(path) if path.suffix == ".gguf" else _load_directory(path)


def load_tokenizer(model_path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of a checkpoint (HF directory or GGUF file); cached per path."""
    resolved = _resolve(Path(model_path).expanduser().resolve())
    return _load_cached(str(resolved))


# --------------------------------------------------------------------------- detokenization


class IncrementalDetokenizer:
    """Streams one sequence's text. Each ``push`` decodes a small window of ids
    (``prefix_offset:``) and emits what it adds beyond the already-emitted window
    (``prefix_offset:read_offset``), as vLLM's ``detokenize_incrementally`` does:
    the prefix gives SentencePiece its leading-space context, and a tail ending in
    U+FFFD (an incomplete multi-byte character) is held back."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""
        self._finished = False

    @property
    def text(self) -> str:
        """All text emitted so far (by ``push`` and ``finish``)."""
        return self._text

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tok.decode(self.token_ids[start:end], skip_special_tokens=self._skip)

    def push(self, new_token_ids: Iterable[int]) -> str:
        """Add generated ids; return the newly completed text (possibly empty)."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.push after finish()")
        self.token_ids.extend(int(i) for i in new_token_ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        self._text += delta
        return delta

    def finish(self) -> str:
        """Flush held-back text, so that ``text == decode(token_ids)``."""
        self._finished = True
        full = self._tok.decode(self.token_ids, skip_special_tokens=self._skip)
        if full.startswith(self._text):
            delta = full[len(self._text):]
        else:  # not expected for byte-level BPE or SentencePiece; emit the window's remainder
            delta = self._decode(self._prefix_offset)[len(self._decode(self._prefix_offset, self._read_offset)):]
        self._text += delta
        return delta


# --------------------------------------------------------------------------- stop strings


def find_stop(text: str, stops: Sequence[str], start: int) -> tuple[int, str] | None:
    """Earliest ``(index, stop)`` with ``text[index:].startswith(stop)``, looking only at
    matches that could involve ``text[start:]`` (the new text): the search begins at
    ``max(0, start - max_stop_len + 1)``. Ties go to the earlier entry of ``stops``."""
    stops = [s for s in stops if s]
    if not stops:
        return None
    begin = max(0, start - max(map(len, stops)) + 1)
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop, begin)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    return best


def truncate_at_stop(text: str, hit: tuple[int, str], include_stop_str_in_output: bool = False) -> str:
    """The final text for a ``find_stop`` hit: cut before (or after) the stop string."""
    index, stop = hit
    return text[: index + len(stop)] if include_stop_str_in_output else text[:index]


def stream_safe_len(text: str, stops: Sequence[str], include_stop_str_in_output: bool = False) -> int:
    """How much of ``text`` (already checked with ``find_stop``) may be streamed now:
    all of it except the longest suffix that is a proper prefix of some stop string,
    since that suffix may yet become a stop string that must be cut. With
    ``include_stop_str_in_output`` nothing is held back (the stop string is output)."""
    if include_stop_str_in_output:
        return len(text)
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return len(text) - hold


def bad_words_token_ids(tokenizer, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Token sequences that ``bad_words`` bans, as vLLM forms them: each word
    (leading spaces stripped) as it is tokenized at the start of a text, and
    with a leading space (how it appears mid-text) when that gives a
    different first token and as many tokens."""
    out: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if not bare:
            raise ValueError(f"bad_words entry {word!r} tokenizes to nothing")
        out.append(bare)
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            out.append(spaced)
    return tuple(dict.fromkeys(out))
