"""fnllm's OpenAI-compatible server: ``AsyncLLMEngine`` (one engine thread),
the FastAPI app (``api_server``), request models (``protocol``) and
Prometheus metrics (``metrics``). ``fnllm serve`` starts it."""
