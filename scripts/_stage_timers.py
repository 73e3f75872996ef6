"""Per-stage CPU counters inside a running gpuserve server, for `cpu_stages.py --counters`.

Imported when the server starts (through the `sitecustomize` that `cpu_stages.py` puts on its
PYTHONPATH), this wraps each step a `/predict` request passes through with a counter of the
event loop thread's CPU time (`time.thread_time_ns`), inclusive of what the step calls. A
coroutine's time is the sum of its steps between awaits, so time spent waiting is not counted.
On SIGUSR1 the totals (calls, nanoseconds) go to the JSON file named by
$GPUSERVE_STAGE_COUNTERS and start again from zero.

Each counted call costs the counter itself about half a microsecond, so the figures run a
little high; the sampling profiler's shares (`cpu_stages.py` without `--counters`) have no
such cost but carry sampling error. Only the event loop's thread is counted.
"""

from __future__ import annotations

import collections
import functools
import inspect
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Generator
from types import ModuleType
from typing import Any

_TOTALS: collections.defaultdict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
_MAIN = threading.main_thread()


def _counted(fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def counted(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not _MAIN:
            return fn(*args, **kwargs)
        started = time.thread_time_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            total = _TOTALS[stage]
            total[0] += 1
            total[1] += time.thread_time_ns() - started

    return counted


class _Steps:
    """Awaits a coroutine, counting the CPU time of each of its steps."""

    __slots__ = ("coroutine", "stage")

    def __init__(self, coroutine: Any, stage: str) -> None:
        self.coroutine, self.stage = coroutine, stage

    def __await__(self) -> Generator[Any, Any, Any]:
        total = _TOTALS[self.stage]
        total[0] += 1
        value: Any = None
        error: BaseException | None = None
        while True:
            started = time.thread_time_ns()
            try:
                if error is not None:
                    waited_on = self.coroutine.throw(error)
                else:
                    waited_on = self.coroutine.send(value)
            except StopIteration as stop:
                return stop.value
            finally:
                total[1] += time.thread_time_ns() - started
            try:
                value, error = (yield waited_on), None
            except BaseException as exc:
                value, error = None, exc


def _counted_async(fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def counted(*args: Any, **kwargs: Any) -> Any:
        return await _Steps(fn(*args, **kwargs), stage)

    return counted


def _wrap(owner: Any, name: str, stage: str, *imported_in: ModuleType) -> None:
    """Count `owner.name`, and the same function where a module imported it by name."""
    fn = getattr(owner, name)
    wrapper = _counted_async if inspect.iscoroutinefunction(fn) else _counted
    counted = wrapper(fn, stage)
    setattr(owner, name, counted)
    for module in imported_in:
        if getattr(module, name, None) is fn:
            setattr(module, name, counted)


def _dump(path: str) -> None:
    # Written aside and renamed, so that a reader never finds half a file.
    with open(f"{path}.part", "w") as out:
        json.dump(dict(_TOTALS), out)
    os.replace(f"{path}.part", path)
    _TOTALS.clear()


# (module, attribute path, stage): the stages of a /predict request, outermost first; the
# indentation of a stage's name says which it runs inside.
STAGES = [
    ("uvicorn.protocols.http.httptools_impl", "RequestResponseCycle.run_asgi", "the app (all)"),
    ("gpuserve.http.context", "RequestContext.__call__", " request context"),
    ("gpuserve.http.lane", "InferenceLane.__call__", "  lane"),
    ("gpuserve.http.routes", "run_predict", "   run_predict"),
    ("gpuserve.http.responses", "read_body", "    read the body"),
    ("gpuserve.protocols.predict", "decode_predict", "    parse and check"),
    ("gpuserve.spec", "to_instance", "     to arrays and check"),
    ("gpuserve.http.responses", "unless_disconnected", "    await the result"),
    ("gpuserve.core.service", "ModelService.predict", "     service.predict"),
    ("gpuserve.core.batcher", "MicroBatcher.submit_many", "      queue the instances"),
    ("gpuserve.http.responses", "json_response", "   encode"),
    ("starlette.responses", "Response.__call__", "   send the response"),
    ("gpuserve.http.connections", "CoalescedWrites.write", "    socket writes"),
    ("gpuserve.core.batcher", "MicroBatcher._dispatch", "form a batch (per batch)"),
    ("gpuserve.core.batcher", "MicroBatcher._finish", "settle a batch (per batch)"),
]
# Protocol methods live on a class built at start-up (connections.guarded_protocol).
PROTOCOL_STAGES = [
    ("data_received", "HTTP in (parse, scope, task)"),
    ("on_response_complete", "HTTP response complete"),
]


def install(path: str) -> None:
    """Wrap the stages and dump their counters to `path` on SIGUSR1."""
    import importlib

    import gpuserve.http.connections as connections
    import gpuserve.http.routes as routes
    import gpuserve.http.v2 as v2
    import gpuserve.protocols.predict as decoding

    for module_name, attribute, stage in STAGES:
        module = importlib.import_module(module_name)
        *classes, name = attribute.split(".")
        owner: Any = module
        for cls in classes:
            owner = getattr(owner, cls)
        _wrap(owner, name, stage, routes, v2, decoding)

    make_protocol = connections.guarded_protocol

    def counted_protocol(*args: Any, **kwargs: Any) -> type:
        protocol: type = make_protocol(*args, **kwargs)
        for name, stage in PROTOCOL_STAGES:
            setattr(protocol, name, _counted(getattr(protocol, name), stage))
        return protocol

    connections.guarded_protocol = counted_protocol
    signal.signal(signal.SIGUSR1, lambda *_: _dump(path))


if os.environ.get("GPUSERVE_STAGE_COUNTERS"):
    install(os.environ["GPUSERVE_STAGE_COUNTERS"])
