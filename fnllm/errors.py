"""Errors that cross the engine's public boundary.

``ValueError`` stays the error for bad input (it names the problem and
changes nothing). The classes here are for the engine itself failing.
"""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine can no longer make progress: executor steps kept failing
    with no culprit request to isolate (a dead device, a broken worker).

    Raised by ``LLMEngine.step`` after ``max_consecutive_failures`` failed
    steps in a row (``__cause__`` is the last executor exception), or at once
    when the executor raises it itself (``fnllm.executor.WorkerError``: a
    worker died or hung). Every live
    request stays in the state (no block is lost); a server should end them
    all with an error and stop.
    """
