"""fnllm.sim: the production scheduler against a cost model, on a virtual clock.

``simulate(workload, config, cost)`` drives a real :class:`fnllm.engine.LLMEngine`
(the same ``schedule``/``commit`` path that serves) with a :class:`SimExecutor`
and a virtual clock that advances by ``cost.step_seconds(plan)`` per step.
Never imports torch or ``fnllm.device`` (a test imports it with torch blocked).
"""

from fnllm.sim.cost import CostModel, load_cost_model
from fnllm.sim.executor import SimExecutor
from fnllm.sim.loop import SimResult, simulate
from fnllm.sim.workload import WorkItem, read_workload, synthetic

__all__ = ["CostModel", "SimExecutor", "SimResult", "WorkItem", "load_cost_model", "read_workload", "simulate", "synthetic"]
