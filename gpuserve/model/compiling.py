"""Compile governance: a compiled model compiles every graph at warm-up and none while serving.

`GraphGate` wraps the torch.compile backend to count graphs and refuse new ones once the model
serves; `recompile_limit` gives each compiled model room for all its graphs (and an error
rather than a silent eager run past them); `graph_trees_for_this_thread` lets a model warmed in
a worker thread keep its CUDA graphs there.
"""

from __future__ import annotations

import collections
import inspect
import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch

from gpuserve.config import ModelSettings

logger = logging.getLogger("gpuserve.model.loading")


class RecompileWhileServing(RuntimeError):
    """A compiled model met a shape it was not warmed up for."""


class GraphGate:
    """A torch.compile backend around the real one: it counts the graphs compiled, and once
    the model serves it refuses new ones.

    Every shape a served batch can have is compiled at warm-up (see `Runner.graph_shapes`),
    so a compile while serving means a shape was missed: raising here fails that batch with
    a clear error instead of stalling it for a compile, or, past torch's recompile limit,
    silently running it eager. Per model, unlike torch's process-wide compiler stance, which
    would stop models that are still loading from compiling.
    """

    def __init__(self, inner: Any, model: str) -> None:
        self.inner = inner
        self.model = model
        self.graphs = 0
        self.serving = False

    def __call__(self, graph: Any, example_inputs: list[Any]) -> Any:
        if self.serving:
            shapes = [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]
            raise RecompileWhileServing(
                f"{self.model}: a new graph was needed while serving (inputs {shapes}); "
                "every shape should have been compiled at warm-up"
            )
        self.graphs += 1
        return self.inner(graph, example_inputs)

    def close(self) -> None:
        self.serving = True

    def __getattr__(self, name: str) -> Any:
        # torch asks the backend for its config and to reset; those are the inner one's.
        return getattr(self.inner, name)


def graph_trees_for_this_thread() -> None:
    """Give the calling thread its own CUDA graph trees, where torch would not.

    Inductor keeps CUDA graph trees in thread-locals that, before torch 2.12, only the thread
    that imported it and autograd's threads have: a model compiled with `reduce-overhead` and
    warmed in a worker thread failed its first batch with a bare AssertionError (seen with
    torch 2.11 on an H100). Newer torch sets them up in any thread; this does the same.
    """
    from torch._inductor import cudagraph_trees as trees

    local, key = trees.local, "tree_manager_containers"
    if hasattr(local, key) or torch._C._is_key_in_tls(key):
        return
    local.tree_manager_containers = {}
    local.tree_manager_locks = collections.defaultdict(threading.Lock)


def compile_backend(settings: ModelSettings) -> Any:
    """The backend torch.compile would build for these settings (mode applies to inductor)."""
    mode = None if settings.compile == "default" else settings.compile
    if settings.compile_backend == "inductor":
        return torch._TorchCompileInductorWrapper(mode, None, False)
    return torch._dynamo.lookup_backend(settings.compile_backend)


# Graphs reserved by the compiled models of this process, for torch versions whose
# torch.compile has no limit of its own per call.
_reserved_graphs = 0


def recompile_limit(graphs: int) -> dict[str, Any]:
    """Room for `graphs` graphs of this model, and an error rather than eager past it.

    torch._dynamo's recompile limit (8 by default) counts the graphs of one code object, and
    every copy of a module shares its `forward`: past the limit, shapes silently ran eager.
    Newer torch takes a limit per torch.compile call, isolated from other calls; older torch
    has one process-wide limit, raised here to what all compiled models reserve together.
    """
    config = torch._dynamo.config
    # The names changed over torch's versions (cache_size_limit before recompile_limit).
    _set_first(config, ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"), True)
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        return {"recompile_limit": graphs, "isolate_recompiles": True}
    global _reserved_graphs
    _reserved_graphs += graphs
    for names in (
        ("recompile_limit", "cache_size_limit"),
        ("accumulated_recompile_limit", "accumulated_cache_size_limit"),
    ):
        current = next((getattr(config, n) for n in names if hasattr(config, n)), 0)
        _set_first(config, names, max(current, _reserved_graphs))
    return {}


def _set_first(config: Any, names: tuple[str, ...], value: Any) -> None:
    """Set the first of `names` that this torch's dynamo config has."""
    for name in names:
        if hasattr(config, name):
            setattr(config, name, value)
            return


def use_compile_cache(folder: Path) -> None:
    """Keep torch's compile caches in `folder`, so that a later start finds them.

    Inductor reads its cache folder from TORCHINDUCTOR_CACHE_DIR at each compile (and writes
    its default there when unset): the variable is the setting torch gives, process-wide.
    """
    folder.mkdir(parents=True, exist_ok=True)
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is not None and Path(current).resolve() != folder.resolve():
        logger.warning(
            "compile_cache_dir %s replaces torch's cache folder %s for the whole process",
            folder,
            current,
        )
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder.resolve())
