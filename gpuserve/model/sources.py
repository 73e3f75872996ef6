"""Where a model's module comes from: a file, or a factory plus a weights file.

- `.pt2`: a `torch.export` program (`torch.export.save`), the format torch recommends now; or
  an AOTInductor package (`torch._inductor.aoti_compile_and_package`), compiled ahead of time
  for one device kind, which starts with no compile at all.
- `.pt`, `.ts`, `.torchscript`: a TorchScript module (`torch.jit.save`), for existing models.
- `factory = "package.module:callable"`: user code that builds a `torch.nn.Module`, with its
  state dict read from `weights` (`.safetensors`, or `.pt`/`.pth` with `weights_only=True`).
"""

from __future__ import annotations

import importlib
import os
import re
import stat
import sys
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any, get_args

import torch

from gpuserve.config import ModelSettings
from gpuserve.core import progress
from gpuserve.core.errors import ModelLoadError
from gpuserve.core.progress import open_counted
from gpuserve.model.compiling import use_compile_cache
from gpuserve.model.layout import (
    EXPORT_SUFFIXES,
    MODEL_SUFFIXES,
    STATE_DICT_SUFFIXES,
    TORCHSCRIPT_SUFFIXES,
)
from gpuserve.spec import DType, ModelSpec, TensorSpec


def load_module(settings: ModelSettings, device: torch.device) -> Any:
    """The configured module, on `device`, in eval mode. Failures are ModelLoadErrors."""
    if settings.factory is not None:
        return _from_factory(settings, device)
    if settings.path is None:
        raise ModelLoadError(f"model {settings.key!r} has no file or factory to load")
    if is_aoti_package(settings.path):
        return load_aoti_package(settings, device)
    return _from_file(settings.path, device, settings.max_batch_size)


def is_aoti_package(path: Path) -> bool:
    """Whether `path` is an AOTInductor package: compiled code, not a program to load."""
    if path.suffix.lower() not in EXPORT_SUFFIXES:
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/data/aotinductor/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_aoti_package(settings: ModelSettings, device: torch.device) -> Any:
    """The compiled model of an AOTInductor package, for `device`; its code was compiled for
    one kind of device, and its precision and graphs are fixed."""
    path = settings.path
    assert path is not None
    require_file(path)
    if settings.compile != "off" or settings.precision != "fp32":
        raise ModelLoadError(
            f"{path} is an AOTInductor package, compiled ahead of time in the precision it "
            f'was compiled in: serve it with compile = "off" and precision = "fp32" (it '
            f"has compile = {settings.compile!r}, precision = {settings.precision!r})"
        )
    if settings.compile_cache_dir is not None:
        # A package's first load prepares inductor's runtime in its cache folder (seconds on
        # a CPU): a kept folder spares the later starts that.
        use_compile_cache(settings.compile_cache_dir)
    index = device.index if device.type == "cuda" and device.index is not None else -1
    try:
        # One load at a time, as for torch.export programs.
        with _EXPORT_LOAD:
            progress.enter(f"loading the compiled {path.name}")
            compiled = torch._inductor.aoti_load_package(str(path), device_index=index)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load {path} as an AOTInductor package: {type(exc).__name__}: {exc}"
        ) from exc
    built_for = str(compiled.get_metadata().get("AOTI_DEVICE_KEY", ""))
    if built_for and built_for != device.type:
        raise ModelLoadError(
            f"{path} is an AOTInductor package compiled for {built_for}, and runs only there; "
            f"this model serves on {device}: compile the package with the model and its "
            f"example inputs on {device.type}, or serve it on {built_for}"
        )
    return compiled


def import_object(target: str, code_dir: Path | None = None) -> Any:
    """Import `package.module:attribute`, from `code_dir` (default: the working directory).
    A `code_dir` given must be one only this server's user or root can change."""
    module_name, _, attribute = target.partition(":")
    if code_dir is not None:
        require_trusted(code_dir)
    folder = str((code_dir or Path.cwd()).resolve())
    # Users run `gpuserve` from their project; its console script does not put cwd on the path.
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"cannot import {target} (from {folder}): {exc}") from exc
    return found


_EXPORT_LOAD = threading.Lock()


def _on_device(program: Any, device: torch.device) -> torch.nn.Module:
    """An exported program's module on `device`, the constants in its graph included, its
    views free of the memory layout the program was traced with (`layout_free_views`)."""
    try:
        from torch.export.passes import move_to_device_pass
    except ImportError:  # torch before 2.5 has no such pass
        module: torch.nn.Module = program.module().to(device)
    else:
        module = move_to_device_pass(program, device).module()
    layout_free_views(module)
    return module


def layout_free_views(module: torch.nn.Module) -> int:
    """Turn the `view`s of an exported graph into `reshape`s; the number turned.

    Export records a `.contiguous()` only where the traced tensor was not contiguous already,
    so a `x.contiguous().view(...)` traced on one device can reach a tensor of another layout
    on another: nn.MultiheadAttention's output, exported on the CPU, is not contiguous on a
    GPU, and the view fails there. A reshape is that same view wherever the view would work,
    and a copy where it would not. Skipped for a graph that writes in place, the one case in
    which a view's aliasing can matter.
    """
    view, reshape = torch.ops.aten.view.default, torch.ops.aten.reshape.default
    turned = 0
    for graph_module in module.modules():
        if not isinstance(graph_module, torch.fx.GraphModule):
            continue
        calls = [node for node in graph_module.graph.nodes if node.op == "call_function"]
        if any(_writes_in_place(node.target) for node in calls):
            continue
        views = [node for node in calls if node.target is view]
        for node in views:
            node.target = reshape
        if views:
            graph_module.recompile()
            turned += len(views)
    return turned


def _writes_in_place(target: Any) -> bool:
    schema = getattr(target, "_schema", None)
    return schema is not None and bool(schema.is_mutable)


def require_file(path: Path) -> None:
    """ModelLoadError unless the model file is there, naming where it was looked for, and
    only this server's user (or root) can change it (`require_trusted`)."""
    if not path.is_file():
        raise ModelLoadError(
            f"model file not found: {path} (looked for {path.resolve()}; relative paths are "
            "taken from the working directory)"
        )
    require_trusted(path)


def require_trusted(path: Path) -> None:
    """ModelLoadError if anyone but this server's user and root could have written `path`
    or replaced it: as SSH's StrictModes, for a model file or a folder of code.

    A model file is code: loading a torch.export or TorchScript file can run what it holds.
    So the file and every folder above it must be owned by this user or root and writable
    by no group or other user; a folder others may write to is accepted only when it is
    sticky and owned by root (as /tmp is), since then nobody else can replace what is in it.
    """
    me = os.geteuid()
    resolved, given = path.resolve(), path.absolute()
    # The file and its folders, and where a link to it lies: whoever could swap the link
    # could swap the model.
    places = dict.fromkeys([resolved, *resolved.parents, *given.parents])
    for place in places:
        try:
            info = place.stat()
        except OSError as exc:
            raise ModelLoadError(f"cannot check who may write {place}: {exc}") from None
        mode = info.st_mode
        sticky_root = stat.S_ISDIR(mode) and bool(mode & stat.S_ISVTX) and info.st_uid == 0
        if info.st_uid not in (me, 0):
            raise ModelLoadError(
                f"refusing to load {path}: {place} belongs to user {info.st_uid}, not to this "
                "server's user or root, and a model file can run code"
            )
        if mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_root:
            raise ModelLoadError(
                f"refusing to load {path}: {place} can be written by other users "
                f"(mode {stat.filemode(mode)}), and a model file can run code; "
                f"fix it with: chmod go-w {place}"
            )


def load_program(path: Path) -> Any:
    """A torch.export program from `path`, on the host; ModelLoadError when it cannot be read."""
    require_file(path)
    missing = sorted(device for device in devices_named(path) if not _available(device))
    if missing:
        # torch.export bakes the export's device into the weights, the constants and the
        # graph, and its loader has no map_location: say so before torch fails obscurely.
        raise ModelLoadError(
            f"{path} was exported on {', '.join(missing)}, which this machine does not have "
            f"({_cuda_here()}): the device is baked into a torch.export program. Export "
            "it from the CPU (the module and example inputs on the CPU), and gpuserve moves it "
            "to the device it serves on, GPU or CPU"
        )
    try:
        # torch.export.load is not thread-safe, and each model loads in its own thread.
        with _EXPORT_LOAD, open_counted(path) as file:
            program = torch.export.load(file)
        progress.enter("placing on the device")
        return program
    except Exception as exc:
        raise ModelLoadError(
            f"could not load {path} as a torch.export program: {type(exc).__name__}: {exc}"
        ) from exc


_DEVICE_FIELD = re.compile(rb'"(?:as_)?device": \{"type": "([a-z]+)", "index": (null|\d+)\}')


def devices_named(path: Path) -> set[str]:
    """The devices a torch.export archive's tensors and graph name (`cpu`, `cuda:0`), read
    from its JSON entries; empty when it is not such an archive."""
    found: set[str] = set()
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(".json"):
                    for kind, index in _DEVICE_FIELD.findall(archive.read(name)):
                        suffix = "" if index == b"null" else f":{int(index)}"
                        found.add(kind.decode() + suffix)
    except (zipfile.BadZipFile, OSError):
        return set()
    return found


def _available(device: str) -> bool:
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return True
    return torch.cuda.is_available() and int(index or 0) < torch.cuda.device_count()


def _cuda_here() -> str:
    if torch.version.cuda is None:
        return "this torch is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is usable"
    return f"{torch.cuda.device_count()} CUDA device(s)"


def program_module(program: Any, device: str) -> torch.nn.Module:
    """An exported program's module on `device` (`cpu`, `cuda:1`)."""
    # The export pass moves the constants baked into the graph too; `.to(device)` on the
    # module would leave those behind. An exported program is frozen in the mode it was
    # exported in: no .eval() here.
    return _on_device(program, torch.device(device))


def spec_from_program(program: Any, name: str, path: Path, max_batch_size: int) -> ModelSpec:
    """The spec a torch.export program implies: its inputs (by their argument names) and
    outputs (`output`, or `output_0`, `output_1`, ... for several), without the batch
    dimension; dimensions exported as dynamic become -1, bounded by `max_shape` when the
    export gave them a finite bound."""
    inputs, outputs = _user_tensors(program)
    if not inputs or not outputs:
        raise ModelLoadError(
            f"{path} takes {len(inputs)} input(s) and returns {len(outputs)} output(s): a "
            f"spec cannot be inferred; write {path.with_suffix('.json')} (see the README's spec)"
        )
    _require_dynamic_batch(program, path, max_batch_size)
    given = [_tensor_spec(input_name, value, program, path) for input_name, value in inputs]
    if len(given) == 1 and given[0].variable:
        # The program takes its one input alone: a padded batch is called without the mask.
        given[0] = given[0].model_copy(update={"mask": False})
    names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
    made = [
        _tensor_spec(output_name, value, program, path)
        for output_name, (_, value) in zip(names, outputs, strict=True)
    ]
    return ModelSpec(name=name, inputs=given, outputs=made)


def _user_tensors(program: Any) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """(name, example value) of the program's user inputs and outputs, in order."""
    signature = program.graph_signature
    nodes = {node.name: node for node in program.graph.nodes}
    inputs = [(name, nodes[name].meta.get("val")) for name in signature.user_inputs]
    (output_node,) = [node for node in program.graph.nodes if node.op == "output"]
    values = [getattr(arg, "meta", {}).get("val") for arg in output_node.args[0]]
    # Mutated buffers come first; the user's outputs are the last ones.
    values = values[len(values) - len(signature.user_outputs) :]
    return inputs, [(str(i), value) for i, value in enumerate(values)]


def _require_dynamic_batch(program: Any, path: Path, batch: int) -> None:
    """ModelLoadError unless the program's first input has a dynamic first dimension, when
    batches of up to `batch` instances are to be run (otherwise the warm-up's first batch
    would fail with torch's guard message), with the way to export it so."""
    inputs, _ = _user_tensors(program)
    if batch <= 1 or not inputs:
        return
    shape = getattr(inputs[0][1], "shape", None)
    if shape is None or len(shape) == 0 or not isinstance(shape[0], int):
        return
    rest = ", ".join(str(dim) for dim in shape[1:])
    # Advice that works when followed: one at a time suits a program exported at batch 1
    # only; one exported at 2 or more takes exactly that many, never a lone request.
    alternative = (
        ", or set max_batch_size = 1"
        if shape[0] == 1
        else f" (exported at {shape[0]}, it cannot run a batch of one: only a new export helps)"
    )
    raise ModelLoadError(
        f"{path} was exported with a fixed batch size of {shape[0]} (its input has shape "
        f"{list(shape)}), and gpuserve batches up to {batch} instances at once. Export it with "
        f"a dynamic batch dimension: torch.export.export(model, (torch.randn(2, {rest}),), "
        f'dynamic_shapes=({{0: torch.export.Dim("batch")}},)){alternative}'
    )


def _tensor_spec(name: str, value: Any, program: Any, path: Path) -> TensorSpec:
    dims = list(value.shape[1:])
    dtype = str(value.dtype).removeprefix("torch.")
    if dtype not in get_args(DType):
        raise ModelLoadError(f"{path}: {name} is {dtype}, which a spec cannot declare")
    shape = tuple(dim if isinstance(dim, int) else -1 for dim in dims)
    bounds = [dim if isinstance(dim, int) else _upper_bound(dim, program) for dim in dims]
    max_shape = None
    if -1 in shape and all(bound is not None for bound in bounds):
        max_shape = tuple(int(bound) for bound in bounds if bound is not None)
    return TensorSpec.model_validate(
        {"name": name, "shape": shape, "dtype": dtype, "max_shape": max_shape}
    )


def _upper_bound(dim: Any, program: Any) -> int | None:
    """The largest size the export allows for a dynamic dimension, if it set one."""
    bound = program.range_constraints.get(getattr(dim, "node", None) and dim.node.expr)
    upper = getattr(bound, "upper", None)
    try:
        return int(upper) if upper is not None else None
    except (TypeError, ValueError):  # sympy's infinity
        return None


def _from_file(path: Path, device: torch.device, max_batch_size: int = 1) -> torch.nn.Module:
    require_file(path)
    suffix = path.suffix.lower()
    if suffix in EXPORT_SUFFIXES:
        program = load_program(path)
        _require_dynamic_batch(program, path, max_batch_size)
        return _on_device(program, device)
    try:
        if suffix in TORCHSCRIPT_SUFFIXES:
            with warnings.catch_warnings():
                # TorchScript is deprecated in torch, but users still hold such files.
                warnings.simplefilter("ignore", DeprecationWarning)
                with open_counted(path) as file:
                    scripted: torch.nn.Module = torch.jit.load(file, map_location=device)
            return scripted.eval()
    except Exception as exc:
        raise ModelLoadError(
            f"could not load {path} as a TorchScript module: {type(exc).__name__}: {exc}"
        ) from exc
    known = ", ".join(sorted(MODEL_SUFFIXES))
    raise ModelLoadError(
        f"unknown model format {suffix!r} for {path}: use one of {known}, or a factory"
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors state dict, tensor by tensor, so that the load's progress moves."""
    from safetensors import safe_open

    tracked = progress.current()
    if tracked is not None:
        tracked.expect(path.stat().st_size)
        tracked.enter(f"reading {path.name}")
    state = {}
    with safe_open(str(path), framework="pt") as file:
        for key in file.keys():  # noqa: SIM118 (a safetensors file is not a dict)
            state[key] = file.get_tensor(key)
            if tracked is not None:
                tracked.advance(state[key].numel() * state[key].element_size())
    return state


def _from_factory(settings: ModelSettings, device: torch.device) -> torch.nn.Module:
    assert settings.factory is not None
    factory = import_object(settings.factory, settings.code_dir)
    if not callable(factory):
        raise ModelLoadError(f"{settings.factory} is not callable")
    try:
        module = factory(**settings.factory_kwargs)
    except Exception as exc:
        raise ModelLoadError(f"{settings.factory} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(
            f"{settings.factory} returned {type(module).__name__}, not a torch.nn.Module"
        )
    if settings.weights is not None:
        _load_weights(module, settings.weights)
    return module.to(device).eval()


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load a state dict strictly: a missing or unexpected key is a load error, not a guess."""
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            state = _read_safetensors(path)
        elif suffix in STATE_DICT_SUFFIXES:
            # weights_only: a pickle from elsewhere must not run code on load.
            with open_counted(path) as file:
                state = torch.load(file, map_location="cpu", weights_only=True)
        else:
            raise ModelLoadError(
                f"unknown weights format {suffix!r} for {path}: use .safetensors or .pt"
            )
        if not isinstance(state, dict):
            raise ModelLoadError(f"{path} holds a {type(state).__name__}, not a state dict")
        module.load_state_dict(state, strict=True)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not load weights {path}: {type(exc).__name__}: {exc}") from exc
