"""Model loading: a model's settings to a Runner on the probed device.

The steps, each logged: read the spec (file or inline), build the handler (the default one,
or the user's class named by `handler`), and load the module through its runner (`sources`
knows the file formats and factories). Warming up, tuning the batch cap and checking reduced
precision are `Runner.warm`, run by the server in the thread that will serve.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from gpuserve.config import ModelSettings
from gpuserve.core.errors import ModelLoadError
from gpuserve.handler import Handler
from gpuserve.model.device import DeviceInfo
from gpuserve.model.runner import Runner
from gpuserve.model.sources import (
    import_object,
    is_aoti_package,
    load_program,
    program_module,
    require_file,
    spec_from_program,
)
from gpuserve.spec import ModelSpec

logger = logging.getLogger("gpuserve.model.loading")


def load_model(settings: ModelSettings, device: DeviceInfo) -> Runner:
    """Load, place on `device`, and warm up in this thread. Every failure is a
    ModelLoadError with the reason.

    The server does the two halves in two threads (`build_model` in the load thread,
    `Runner.warm` in the worker thread that will serve); this is both at once, for callers
    that serve from the thread they load in.
    """
    runner = build_model(settings, device)
    runner.warm()
    return runner


def build_model(
    settings: ModelSettings,
    device: DeviceInfo,
    *,
    module: Any = None,
    handler_class: type[Handler] | None = None,
) -> Runner:
    """Read the spec, build the handler and load its module onto `device` through its runner;
    no warm-up yet.

    `module` (already on `device`) and `handler_class` replace what the settings name: the
    Python API serves objects in memory so.
    """
    started = time.monotonic()
    origin = _origin(settings, module, handler_class)
    if settings.path is not None:
        # Before the spec, whose own absence would otherwise be reported instead.
        require_file(settings.path)
    try:
        source = settings.spec_source()
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    if module is None and _inferred_spec(settings, source):
        # A .pt2 program without a spec: the program's own shapes and dtypes are the spec.
        assert settings.path is not None
        if is_aoti_package(settings.path):
            raise ModelLoadError(
                f"{settings.path} is an AOTInductor package, which does not describe its "
                f"inputs and outputs: write {source} (a spec; see docs/models.md)"
            )
        program = load_program(settings.path)
        spec = spec_from_program(program, settings.key, settings.path, settings.max_batch_size)
        logger.info(
            "%s: no spec at %s; inferred from the program: input %s, output %s",
            spec.name,
            source,
            spec.describe_inputs(),
            spec.describe_outputs(),
        )
        module = program_module(program, device.device)
    else:
        spec = ModelSpec.resolve(source, settings.key)
    handler = (handler_class or _handler_class(settings))(spec, device, settings, module=module)
    runner = Runner(handler)
    runner.setup()
    logger.info(
        "loaded %s from %s on %s in %.2fs",
        spec.name,
        origin,
        device.device,
        time.monotonic() - started,
    )
    return runner


def _origin(settings: ModelSettings, module: Any, handler_class: type[Handler] | None) -> str:
    """Where a model comes from, for the load's log line."""
    if module is not None:
        return f"a {type(module).__name__} in memory"
    if handler_class is not None and settings.path is None and settings.factory is None:
        return f"{handler_class.__module__}.{handler_class.__qualname__}.load"
    if settings.path is not None:
        size = settings.path.stat().st_size if settings.path.is_file() else None
        return str(settings.path) + ("" if size is None else f" ({size / 2**20:.1f} MiB)")
    return str(settings.factory or f"{settings.handler}.load")


def _inferred_spec(settings: ModelSettings, source: object) -> bool:
    """Whether the spec is to be read from the program: a .pt2 file served by the default
    handler, with no spec given and no .json beside it."""
    return (
        settings.spec is None
        and settings.handler is None
        and settings.path is not None
        and settings.path.suffix.lower() == ".pt2"
        and isinstance(source, Path)
        and not source.exists()
    )


def _handler_class(settings: ModelSettings) -> type[Handler]:
    if settings.handler is None:
        return Handler
    found = import_object(settings.handler, settings.code_dir)
    if not (isinstance(found, type) and issubclass(found, Handler)):
        raise ModelLoadError(f"{settings.handler} is not a subclass of gpuserve.handler.Handler")
    return found
