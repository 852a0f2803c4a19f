"""fnllm.tokenizer against the real SmolLM2 GGUF tokenizer, plus tiny Pangu-style
checkpoints built on the fly (a tokenizer.json and a SentencePiece tokenizer.model)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from fnllm.tokenizer import (
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    Tokenizer,
    find_stop,
    load_tokenizer,
    render_pangu_chat,
    stream_safe_len,
    truncate_at_stop,
)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog.  Twice!\n",
    "chinese": "你好世界，今天天气很好。我们去公园散步吧！",
    "code": 'def f(x: int) -> int:\n    """Square."""\n    return x ** 2  # 12345\n\tpass\n',
    "emoji": "Hi 👋🏽 你好世界 🚀 family: 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
}


def _gguf_path() -> Path:
    try:
        from fnllm.model.fetch import default_model_path
    except ImportError:
        cache = os.environ.get("FNLLM_CACHE")
        path = (Path(cache).expanduser() if cache else Path.home() / ".cache" / "fnllm") / GGUF_NAME
        if not path.is_file():
            pytest.fail(f"demo model {path} is missing: run `python -m fnllm.model.fetch` first")
        return path
    try:
        return Path(default_model_path())
    except FileNotFoundError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return load_tokenizer(str(_gguf_path()))


def _stream(tok: Tokenizer, ids: list[int], chunk: int = 1) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.finish())
    return deltas, detok


# --------------------------------------------------------------------------- SmolLM2 (GGUF)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_round_trip(smol: Tokenizer, name: str) -> None:
    text = TEXTS[name]
    ids = smol.encode(text)
    assert ids and all(0 <= i < smol.vocab_size for i in ids)
    assert smol.decode(ids) == text
    assert smol.encode(text, add_special_tokens=False) == ids  # SmolLM2's GGUF adds no BOS


def test_special_ids_and_sizes(smol: Tokenizer) -> None:
    assert smol.eos_token_ids == (2, 0)  # <|im_end|> (GGUF eos) then <|endoftext|> (llama.cpp EOG)
    assert smol.eos_token_id == 2
    assert smol.bos_token_id == 1
    assert smol.vocab_size == 49152
    assert smol.decode([1, 2, 0], skip_special_tokens=False) == "<|im_start|><|im_end|><|endoftext|>"
    assert smol.decode([1, 2, 0]) == ""
    assert load_tokenizer(str(_gguf_path())) is smol  # cached per path
    assert load_tokenizer(str(_gguf_path().parent)) is smol  # a directory holding the one .gguf


def test_chat_template(smol: Tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    expected = SMOL_SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert smol.apply_chat_template(messages) == expected
    assert smol.apply_chat_template(messages, add_generation_prompt=False) == expected.removesuffix(
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert smol.apply_chat_template(with_system).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    ids = smol.apply_chat_template_ids(messages)
    assert ids[0] == 1 and ids.count(2) == 2
    assert ids[-4:] == [1, *smol.encode("assistant\n")]
    assert smol.decode(ids, skip_special_tokens=False) == expected


@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_detokenize_emoji(smol: Tokenizer, chunk: int) -> None:
    for text in ("Hi 👋🏽 你好世界 🚀", TEXTS["emoji"], TEXTS["chinese"], TEXTS["code"]):
        ids = smol.encode(text)
        deltas, detok = _stream(smol, ids, chunk)
        assert not any(REPLACEMENT_CHAR in d for d in deltas), deltas
        assert "".join(deltas) == smol.decode(ids) == text == detok.text


def test_incremental_detokenize_skips_special_tokens(smol: Tokenizer) -> None:
    ids = smol.apply_chat_template_ids([{"role": "user", "content": "héllo 🚀"}]) + smol.encode("Sure 😀") + [2]
    deltas, _ = _stream(smol, ids)
    assert "".join(deltas) == smol.decode(ids)
    assert "<|im" not in "".join(deltas)
    kept, _ = _stream_keep_special(smol, ids)
    assert kept == smol.decode(ids, skip_special_tokens=False)


def _stream_keep_special(tok: Tokenizer, ids: list[int]) -> tuple[str, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    text = "".join(detok.push([i]) for i in ids) + detok.finish()
    return text, detok


def test_incremental_detokenize_random_ids(smol: Tokenizer) -> None:
    """Arbitrary ids (stray UTF-8 byte tokens, specials) in random chunk sizes: the
    deltas never end mid-character and always add up to decode(all)."""
    rng = random.Random(1234)
    for _ in range(60):
        ids = [rng.randrange(smol.vocab_size if rng.random() < 0.5 else 300) for _ in range(rng.randrange(1, 30))]
        detok = IncrementalDetokenizer(smol)
        deltas, i = [], 0
        while i < len(ids):
            step = rng.randrange(1, 4)
            deltas.append(detok.push(ids[i : i + step]))
            i += step
        assert not any(d.endswith(REPLACEMENT_CHAR) for d in deltas), (ids, deltas)
        assert "".join(deltas) + detok.finish() == smol.decode(ids) == detok.text


def test_stop_string_spanning_two_pushes(smol: Tokenizer) -> None:
    ids = smol.encode("Hello world, goodbye moon")
    stop = "o wor"  # spans the tokens "Hello" and " world"
    detok = IncrementalDetokenizer(smol)
    hit, pushes = None, 0
    for token in ids:
        before = len(detok.text)
        delta = detok.push([token])
        pushes += 1
        hit = find_stop(detok.text, ("moon", stop), before)
        if hit:
            assert delta and stop not in detok.text[:before]  # completed by this push
            break
    assert hit == (4, stop) and pushes >= 2
    assert truncate_at_stop(detok.text, hit) == "Hell"
    assert truncate_at_stop(detok.text, hit, include_stop_str_in_output=True) == "Hello wor"


# --------------------------------------------------------------------------- stop-string helpers


def test_find_stop_semantics() -> None:
    assert find_stop("abc STOP x END", ("END", "STOP"), 0) == (4, "STOP")  # earliest wins
    assert find_stop("abcSTOP", ("STOP",), 6) == (3, "STOP")  # reaches back max_len - 1
    assert find_stop("STOPabcdefg", ("STOP",), 8) is None  # already checked before `start`
    assert find_stop("aaa", (), 0) is None and find_stop("aaa", ("",), 0) is None
    assert find_stop("xyzab", ("ab", "zab"), 0) == (2, "zab")
    assert stream_safe_len("answer <|e", ("<|end|>",)) == len("answer ")
    assert stream_safe_len("answer <|e", ("<|end|>",), include_stop_str_in_output=True) == len("answer <|e")
    assert stream_safe_len("answer", ("xyz",)) == len("answer")
    assert stream_safe_len("aab", ("abc", "bx")) == 1  # "ab" may become "abc"


# --------------------------------------------------------------------------- Pangu-style checkpoints

PANGU_CONFIG = {"architectures": ["PanguEmbeddedForCausalLM"], "model_type": "PanguEmbedded"}
PANGU_CORPUS = ["Hello world, how are you today?", "你好，世界！我是助手。用户说：系统提示。", "The quick brown fox."] * 10
PANGU_MESSAGES = [{"role": "user", "content": "你好 Hello"}]
PANGU_PROMPT = "[unused9]系统：[unused10][unused9]用户：你好 Hello[unused10][unused9]助手："


def _write_pangu_config(directory: Path, eos_id: int, tokenizer_class: bool) -> None:
    (directory / "config.json").write_text(json.dumps({**PANGU_CONFIG, "eos_token_id": eos_id}))
    if tokenizer_class:  # like openPangu: a custom tokenizer class that must not be executed
        cfg = {
            "tokenizer_class": "PanguTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_openpangu.PanguTokenizer", None]},
            "bos_token": "<s>", "eos_token": "[unused10]", "unk_token": "<unk>", "add_bos_token": True,
            "added_tokens_decoder": {
                str(i): {"content": c, "special": True} for i, c in ((3, "[unused9]"), (4, "[unused10]"))
            },
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def pangu_json_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    directory = tmp_path_factory.mktemp("pangu_json")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "[unused9]", "[unused10]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(PANGU_CORPUS, trainer)
    tok.save(str(directory / "tokenizer.json"))
    _write_pangu_config(directory, eos_id=4, tokenizer_class=True)
    return directory


@pytest.fixture(scope="module")
def pangu_sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import sentencepiece as spm

    directory = tmp_path_factory.mktemp("pangu_sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(PANGU_CORPUS), model_prefix=str(directory / "tokenizer"), vocab_size=400,
        user_defined_symbols=["[unused9]", "[unused10]"], byte_fallback=True, character_coverage=1.0,
        model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
    )
    _write_pangu_config(directory, eos_id=4, tokenizer_class=True)
    return directory


@pytest.mark.parametrize("fixture", ["pangu_json_dir", "pangu_sp_dir"])
def test_pangu_chat_format(request: pytest.FixtureRequest, fixture: str) -> None:
    tok = load_tokenizer(str(request.getfixturevalue(fixture)))
    assert tok.is_pangu and tok.chat_template is None
    assert tok.eos_token_ids == (4,)
    assert tok.apply_chat_template(PANGU_MESSAGES) == PANGU_PROMPT
    assert tok.apply_chat_template(PANGU_MESSAGES, add_generation_prompt=False) == PANGU_PROMPT.removesuffix(
        "[unused9]助手："
    )
    ids = tok.apply_chat_template_ids(PANGU_MESSAGES)
    assert ids[0] == 3 and ids.count(3) == 3 and ids.count(4) == 2
    assert tok.decode(ids, skip_special_tokens=False) == PANGU_PROMPT
    system = [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]
    assert render_pangu_chat(system, False) == "[unused9]系统：S[unused10][unused9]助手：A[unused10]"


def test_sentencepiece_incremental_detokenize(pangu_sp_dir: Path) -> None:
    tok = load_tokenizer(str(pangu_sp_dir))
    assert tok.bos_token_id == 1
    for text in ("Hello world, how are you", " leading space", "你好 🚀 fox  two  spaces", "系统：🇫🇷 ok"):
        ids = tok.encode(text)
        assert ids[0] == 1 and tok.encode(text, add_special_tokens=False) == ids[1:]
        assert tok.decode(ids) == text  # the dummy-prefix space is dropped, a real one kept
        deltas, detok = _stream(tok, ids + [4])
        assert not any(REPLACEMENT_CHAR in d for d in deltas), deltas
        assert "".join(deltas) == detok.text == tok.decode(ids + [4]) == text


def test_checkpoint_template_wins_over_pangu_format(pangu_json_dir: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (tmp_path / name).write_bytes((pangu_json_dir / name).read_bytes())
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (tmp_path / "chat_template.jinja").write_text(template)
    tok = load_tokenizer(str(tmp_path))
    assert tok.apply_chat_template(PANGU_MESSAGES) == "<user>你好 Hello"


def test_no_template_and_not_pangu_is_an_error(pangu_json_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((pangu_json_dir / "tokenizer.json").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    tok = load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(PANGU_MESSAGES)


def test_missing_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(PANGU_CONFIG))
    for path in (tmp_path, tmp_path / "nope"):
        with pytest.raises(ValueError, match="tokenizer.json") as info:
            load_tokenizer(str(path))
        assert str(path) in str(info.value)


def test_bad_words_token_ids_with_and_without_space(smol: Tokenizer) -> None:
    from fnllm.tokenizer import bad_words_token_ids

    got = bad_words_token_ids(smol, ["Paris", "  Paris"])
    bare = tuple(smol.encode("Paris", add_special_tokens=False))
    spaced = tuple(smol.encode(" Paris", add_special_tokens=False))
    assert bare != spaced and got == (bare, spaced)  # leading spaces stripped first, no duplicates
