"""fnllm: a pure-functional LLM inference engine (see README.md).

``from fnllm import LLM, SamplingParams`` works as in vLLM; the heavy parts
(torch, the model) load only when ``LLM`` or ``LLMEngine`` is first used, so
the pure core imports without torch.
"""

__version__ = "0.1.0"

_LAZY = {
    "LLM": ("fnllm.llm", "LLM"),
    "LLMEngine": ("fnllm.engine", "LLMEngine"),
    "AsyncLLMEngine": ("fnllm.server.async_engine", "AsyncLLMEngine"),
    "SamplingParams": ("fnllm.state", "SamplingParams"),
    "GuidedDecodingParams": ("fnllm.state", "GuidedDecodingParams"),
    "RequestOutput": ("fnllm.outputs", "RequestOutput"),
    "CompletionOutput": ("fnllm.outputs", "CompletionOutput"),
    "RequestOutputKind": ("fnllm.state", "RequestOutputKind"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'fnllm' has no attribute {name!r}")
