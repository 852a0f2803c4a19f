"""``fnllm serve`` argument errors: one ``fnllm: error:`` line, exit 2, before any model loads."""

from __future__ import annotations

import pytest

from fnllm.cli import build_parser, main


@pytest.mark.parametrize("argv, needle", [
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--max-waiting", "-1"], "--max-waiting"),
    (["serve", "--shutdown-timeout", "-5"], "--shutdown-timeout"),
])
def test_bad_serve_arguments_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fnllm: error:") and needle in err and "Traceback" not in err


def test_serve_takes_the_engine_options():
    args = build_parser().parse_args(["serve", "m.gguf", "--dtype", "bfloat16", "--block-size", "32",
                                      "--num-kv-blocks", "100", "--max-num-seqs", "8", "--max-model-len", "256",
                                      "--no-prefix-caching", "--served-model-name", "a", "b", "--api-key", "k"])
    assert (args.model_path, args.dtype, args.block_size, args.num_kv_blocks, args.max_num_seqs) == (
        "m.gguf", "bfloat16", 32, 100, 8)
    assert args.no_prefix_caching and args.served_model_name == ["a", "b"] and args.shutdown_timeout == 30.0


def test_serve_maps_the_kv_pages_of_an_in_process_executor(caplog):
    from types import SimpleNamespace

    from fnllm.cli import _map_kv_pages

    calls = []
    ex = SimpleNamespace(populate_kv=lambda: calls.append(1) or True)
    with caplog.at_level("INFO", logger="fnllm.serve"):
        _map_kv_pages(SimpleNamespace(llm_engine=SimpleNamespace(executor=ex)))
    assert calls == [1] and "KV cache pages mapped" in caplog.text
    _map_kv_pages(SimpleNamespace(llm_engine=SimpleNamespace(executor=object())))  # a worker executor: nothing to do
