"""The ``fnllm`` command line: ``generate`` (and ``replay``, see fnllm.replay_cli;
``simulate`` and ``calibrate``, see fnllm.sim_cli).

Bad input (a bad flag value, a missing file, a prompt that cannot be
served) prints one ``fnllm: error: ...`` line and exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from fnllm.errors import EngineDeadError
from fnllm.state import SamplingParams

USER_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, PermissionError, json.JSONDecodeError)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: the demo SmolLM2 model)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "npu"))
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--swap-space", type=float, default=None, help="GiB of host memory for the host KV tier")
    p.add_argument("--preemption-mode", default="recompute", choices=("recompute", "swap"))
    p.add_argument("--kv-offload-dir", default=None, help="directory of the persistent disk KV prefix cache")
    p.add_argument("--kv-offload-bytes", type=int, default=16 << 30, help="bound on the disk KV tier (bytes)")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1, help="ranks that split every layer")
    p.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1, help="pipeline stages that split the layers")
    p.add_argument("--distributed-executor-backend", default=None, choices=("uni", "mp", "ray"),
                   help="how workers run (default: uni for one rank, mp otherwise)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="a request's tokens do not depend on what else is in its batch (CPU kernels)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='n-gram speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 4, "prompt_lookup_min": 2}\'')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fnllm", description="fnllm: a pure-functional LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text (streams to the terminal)")
    g.add_argument("prompt", nargs="?", help="the prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--guided-json", default=None, help="structured output: a JSON schema (text, or @file)")
    g.add_argument("--guided-regex", default=None, help="structured output: a regular expression")
    g.add_argument("--guided-choice", action="append", default=None, help="structured output: one of these (repeatable)")
    g.add_argument("--guided-grammar", default=None, help="structured output: an EBNF grammar (text, or @file)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2]: penalize tokens already generated")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2]: penalize by generated count")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0 (vLLM's): > 1 discourages repeats")
    g.add_argument("--logit-bias", type=json.loads, default=None, metavar="JSON",
                   help='token id -> bias as a JSON object, e.g. \'{"50256": -100}\'')
    g.add_argument("--bad-word", action="append", default=[], dest="bad_words", help="a word never generated (repeatable)")
    g.add_argument("--prompts-file", default=None, help="JSON lines: a string, or {prompt|messages, ...sampling}")
    g.add_argument("--output", default=None, help="write JSON lines of results here")
    g.add_argument("--json", action="store_true", help="print results as JSON instead of streaming text")
    g.add_argument("--record", default=None, help="record a replayable trace to this file")
    _add_model_args(g)
    _add_serve_parser(sub)
    try:
        from fnllm.replay_cli import add_replay_parser

        add_replay_parser(sub)
    except ImportError:
        pass
    from fnllm.sim_cli import add_sim_parsers

    add_sim_parsers(sub)
    return parser


def _add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (see README: Serving)")
    s.add_argument("model_path", nargs="?", default=None, metavar="MODEL", help="as --model")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", nargs="+", default=None, help="name(s) clients use (default: the model)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (or FNLLM_API_KEY)")
    s.add_argument("--max-waiting", type=int, default=None, help="answer 429 when this many requests wait")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    s.add_argument("--disable-uvicorn-access-log", action="store_true")
    _add_model_args(s)


def cmd_serve(args) -> int:
    import logging
    import os
    from pathlib import Path

    from fnllm.server.api_server import run_server
    from fnllm.server.async_engine import AsyncLLMEngine

    if args.model_path is not None:
        args.model = args.model_path
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_waiting is not None and args.max_waiting < 0:
        raise ValueError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if not args.shutdown_timeout >= 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    api_key = args.api_key or os.environ.get("FNLLM_API_KEY") or None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    llm = _make_llm(args)
    _map_kv_pages(llm)
    names = args.served_model_name or [args.model or Path(llm.llm_engine.config.model.model).stem]
    engine = AsyncLLMEngine.from_llm(llm, max_waiting=args.max_waiting)
    return run_server(engine, names, host=args.host, port=args.port, api_key=api_key,
                      shutdown_timeout=args.shutdown_timeout, access_log=not args.disable_uvicorn_access_log)


def _map_kv_pages(llm) -> None:
    """A server maps its KV cache's pages before the first request, so early
    requests pay no first-touch page faults (in-process executors; a worker
    process maps its own lazily)."""
    import logging
    import time

    populate = getattr(llm.llm_engine.executor, "populate_kv", None)
    t = time.perf_counter()
    if populate is not None and populate():
        logging.getLogger("fnllm.serve").info("KV cache pages mapped in %.2f s", time.perf_counter() - t)


def _sampling(args, overrides: dict | None = None) -> SamplingParams:
    kw = dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, seed=args.seed, stop=tuple(args.stop),
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty, logit_bias=args.logit_bias, bad_words=tuple(args.bad_words),
    )
    import attrs

    known = {f.name for f in attrs.fields(SamplingParams) if f.init}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise ValueError(f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
    guided = _guided_args(args)
    if guided is not None:
        kw["guided_decoding"] = guided
    kw.update(overrides or {})
    return SamplingParams(**kw)


def _guided_args(args):
    """--guided-json/-regex/-choice/-grammar as a GuidedDecodingParams (None without any)."""
    from fnllm.state import GuidedDecodingParams

    def text(value):
        if value is not None and value.startswith("@"):
            with open(value[1:], encoding="utf-8") as f:
                return f.read()
        return value

    kw = {"json": text(getattr(args, "guided_json", None)), "regex": getattr(args, "guided_regex", None),
          "choice": getattr(args, "guided_choice", None), "grammar": text(getattr(args, "guided_grammar", None))}
    kw = {k: v for k, v in kw.items() if v is not None}
    return GuidedDecodingParams(**kw) if kw else None


def _make_llm(args):
    from fnllm.llm import LLM

    return LLM(
        model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks, max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=not args.no_prefix_caching, trace=getattr(args, "record", None),
        swap_space=args.swap_space, preemption_mode=args.preemption_mode,
        kv_offload_dir=args.kv_offload_dir, kv_offload_bytes=args.kv_offload_bytes,
        batch_invariant=args.batch_invariant, speculative_config=_speculative(args), **_parallel_kwargs(args),
    )


def _speculative(args) -> dict | None:
    """``--speculative-config`` as a dict (validated by the engine config)."""
    text = getattr(args, "speculative_config", None)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--speculative-config is not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--speculative-config must be a JSON object, got {text!r}")
    return value


def _parallel_kwargs(args) -> dict:
    """The LLM's parallel arguments from the model flags (shared by generate and serve)."""
    return dict(tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
                distributed_executor_backend=args.distributed_executor_backend)


def _prompt_of(llm, text: str, chat: bool, system: str | None):
    if not chat:
        return text
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    tok = llm.get_tokenizer()
    return {"prompt": tok.apply_chat_template(messages), "prompt_token_ids": tok.apply_chat_template_ids(messages)}


def _read_prompts(llm, args) -> tuple[list, list[SamplingParams]]:
    prompts, params = [], []
    with open(args.prompts_file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            item = json.loads(line)
            if isinstance(item, str):
                item = {"prompt": item}
            if not isinstance(item, dict) or not ("prompt" in item or "messages" in item):
                raise ValueError(f"{args.prompts_file} line {n}: expected a string or an object with 'prompt' or 'messages'")
            overrides = {k: v for k, v in item.items() if k not in ("prompt", "messages")}
            if "messages" in item:
                tok = llm.get_tokenizer()
                prompts.append({"prompt": tok.apply_chat_template(item["messages"]),
                                "prompt_token_ids": tok.apply_chat_template_ids(item["messages"])})
            else:
                prompts.append(_prompt_of(llm, item["prompt"], args.chat, args.system))
            params.append(_sampling(args, overrides))
    return prompts, params


def _as_json(out) -> dict:
    return {
        "request_id": out.request_id,
        "prompt": out.prompt,
        "num_cached_tokens": out.num_cached_tokens,
        "outputs": [
            {"index": c.index, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
             "stop_reason": c.stop_reason}
            for c in out.outputs
        ],
        "error": out.error,
        **({"prompt_logprobs": out.prompt_logprobs} if out.prompt_logprobs is not None else {}),
    }


def _stream(llm, prompt, sp) -> int:
    engine = llm.llm_engine
    engine.add_request("cli-0", prompt, sp)
    shown, error = 0, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text if out.outputs else ""
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown, error = len(text), out.error
    sys.stdout.write("\n")
    if error:
        print(f"fnllm: error: {error}", file=sys.stderr)
        return 1
    return 0


ONE_SHOT_ENV = {
    "FNLLM_PACK_LINEAR": "lazy",  # each weight packed for oneDNN when a step first needs it (the same numbers)
    "FNLLM_HUGE_PAGES": "0",  # no 2 MiB pages for the weights: their first touch costs more than a short run saves
}


@contextlib.contextmanager
def _one_shot_env():
    """While the LLM is built: a one-shot run sets :data:`ONE_SHOT_ENV` (what a
    run of a few short steps should not pay). A variable the user set wins;
    the process's environment is restored afterwards."""
    mine = [k for k in ONE_SHOT_ENV if k not in os.environ]
    os.environ.update({k: ONE_SHOT_ENV[k] for k in mine})
    try:
        yield
    finally:
        for k in mine:
            os.environ.pop(k, None)


def cmd_generate(args) -> int:
    if (args.prompt is None) == (args.prompts_file is None):
        raise ValueError("give a prompt or --prompts-file (one of the two)")
    with _one_shot_env(), _make_llm(args) as llm:
        return _generate(llm, args)


def _generate(llm, args) -> int:
    if args.prompts_file:
        prompts, params = _read_prompts(llm, args)
    else:
        prompts, params = [_prompt_of(llm, args.prompt, args.chat, args.system)], [_sampling(args)]
    if args.prompt is not None and not args.json and not args.output:
        return _stream(llm, prompts[0], params[0])
    outs = llm.generate(prompts, params, use_tqdm=sys.stderr.isatty())
    lines = [json.dumps(_as_json(o), ensure_ascii=False) for o in outs]
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
    if args.json or not args.output:
        print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "serve":
            return cmd_serve(args)
        return args.run(args)
    except USER_ERRORS as e:
        print(f"fnllm: error: {e}", file=sys.stderr)
        return 2
    except EngineDeadError as e:  # the device failed for good: one line, not a traceback
        print(f"fnllm: error: {e}", file=sys.stderr)
        return 1


def run() -> None:
    """The console entry point (``fnllm``, ``python -m fnllm.cli``): ``main()``,
    then, for the one-shot commands, a quick exit. The interpreter's own
    teardown (freeing the model, torch's static destructors) takes about 0.5 s
    after the work is done; instead the streams are flushed, the atexit hooks
    run (the engine's shutdown, the disk tier's close, logging) and the process
    ends with ``os._exit``. ``main()`` itself, as tests and embedders call it,
    always returns."""
    argv = sys.argv[1:]
    rc = main(argv)
    if argv[:1] == ["serve"]:  # the server shuts down on its own terms
        sys.exit(rc)
    import atexit

    _flush()
    atexit._run_exitfuncs()
    _flush()
    os._exit(rc)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (| head): nothing more to say
            pass


if __name__ == "__main__":
    run()
