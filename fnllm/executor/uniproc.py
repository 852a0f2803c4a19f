"""``UniProcExecutor``: the whole model in the driver's process (world size 1).

It is :class:`~fnllm.device.executor.ModelExecutor` itself, plus the
executor lifecycle (``shutdown``, a context manager): no worker, no pipe, no
process group, so a single-device run pays nothing for the framework.
"""

from __future__ import annotations

from fnllm.device.executor import ModelExecutor


class UniProcExecutor(ModelExecutor):
    world_size = 1
    output_rank = 0

    def worker_stats(self) -> list[dict]:
        params = sum(p.numel() * p.element_size() for p in {id(p): p for p in self.model.parameters()}.values())
        kv = sum(c.numel() * c.element_size() for c in self.kv_caches)
        return [{"rank": 0, "tp_rank": 0, "pp_rank": 0, "layers": [0, self.config.num_layers],
                 "heads": self.config.num_heads, "kv_heads": self.config.num_kv_heads,
                 "param_bytes": params, "kv_bytes": kv, "comm": {}}]

    def reset_worker_stats(self) -> None:
        pass

    def shutdown(self) -> None:
        """Drop the weights and the KV cache."""
        self.model, self.kv_caches = None, []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
