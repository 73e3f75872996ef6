"""`gpuserve.serve`: serve a model from Python in one call, as `gpuserve serve` does.

    import gpuserve
    gpuserve.serve(module, spec={"input": {"shape": [64]}, "output": {"shape": [10]}})

The model may be a module in memory, a model file, or a `Handler` subclass; the keyword
arguments are any server or model setting, and override `GPUSERVE_*` environment variables.
"""

from __future__ import annotations

import copy
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuserve.config import ModelSettings, Settings
from gpuserve.handler import Handler
from gpuserve.model.device import DeviceInfo
from gpuserve.spec import ModelSpec

if TYPE_CHECKING:
    from gpuserve.model.runner import Runner

# Stands in for the model's source in its settings; the loader brings the object itself.
_IN_MEMORY = "gpuserve.handler:Handler"


def serve(
    model: Any,
    spec: ModelSpec | dict[str, Any] | str | Path | None = None,
    *,
    handler: type[Handler] | None = None,
    **settings: Any,
) -> None:
    """Serve `model` over HTTP until SIGTERM or Ctrl-C, then drain and return.

    - `model`: a `torch.nn.Module` (or any callable taking a batch tensor), a path to a
      `.pt2` or TorchScript file, or a `Handler` subclass whose `load` builds the model.
    - `spec`: the input and output (a ModelSpec, its keys as a dict, or a `.json` path).
      Needed for a module or a handler; for a file, the `.json` beside it, else inferred
      from a `.pt2` program.
    - `handler`: a `Handler` subclass with this model's own hooks, for a module or file.
    - `settings`: server settings (`port`, `host`, `device`, `api_keys`, ...) and model
      settings (`name`, `max_batch_size`, `max_wait_ms`, `precision`, ...).

    Raises pydantic's ValidationError for a bad setting; exits with status 1, as the
    command does, when the model fails to load.
    """
    from gpuserve.logs import configure as configure_logging
    from gpuserve.server import run

    full, loader = configure(model, spec, handler=handler, **settings)
    configure_logging(full.log_level, full.log_format)
    run(full, loader)


def configure(
    model: Any,
    spec: ModelSpec | dict[str, Any] | str | Path | None = None,
    *,
    handler: type[Handler] | None = None,
    **settings: Any,
) -> tuple[Settings, Any]:
    """The settings and the loader `serve` runs with, without serving (for tests, or to
    build an app with `gpuserve.create_app(settings, loader=loader)`)."""
    server_keys = set(Settings.model_fields) - {"model", "models"}
    server = {key: value for key, value in settings.items() if key in server_keys}
    chosen: dict[str, Any] = {k: v for k, v in settings.items() if k not in server_keys}
    if isinstance(spec, ModelSpec):
        spec = spec.model_dump(exclude={"name"})
    if spec is not None:
        chosen["spec"] = Path(spec) if isinstance(spec, str) else spec
    handler_class = handler
    module = None
    if isinstance(model, (str, Path)):
        chosen["path"] = Path(model)
    elif isinstance(model, type) and issubclass(model, Handler):
        handler_class = model
        chosen.setdefault("name", _name_of(model.__name__))
    elif callable(model):
        module = model
        chosen.setdefault("name", _name_of(type(model).__name__))
    else:
        raise TypeError(
            f"cannot serve a {type(model).__name__}: give a torch module, a model file's "
            "path, or a gpuserve.handler.Handler subclass"
        )
    if not isinstance(model, (str, Path)):
        chosen["handler"] = _IN_MEMORY
        if spec is None:
            raise TypeError("a model in memory needs a spec: its input and output shapes")
    model_settings = ModelSettings.model_validate(chosen)
    # Through __init__, not model_validate: the environment must still apply beneath.
    full = Settings(**server, model=model_settings.model_dump(exclude_unset=True))
    return full, _Loader(module, handler_class)


class _Loader:
    """Loads the object given to `serve` instead of what the settings name: the module is
    placed on each device once (moved to the first, copied to others), the handler class
    used as it is."""

    def __init__(self, module: Any, handler_class: type[Handler] | None) -> None:
        self._module = module
        self._handler_class = handler_class
        self._placed: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, settings: ModelSettings, device: DeviceInfo) -> Runner:
        from gpuserve.model.loading import build_model

        return build_model(
            settings,
            device,
            module=self._on(device.device) if self._module is not None else None,
            handler_class=self._handler_class,
        )

    def _on(self, device: str) -> Any:
        with self._lock:
            if device not in self._placed:
                module = self._module if not self._placed else copy.deepcopy(self._module)
                if hasattr(module, "to"):
                    module = module.to(device)
                if hasattr(module, "eval"):
                    module = module.eval()
                self._placed[device] = module
            return self._placed[device]


def _name_of(class_name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "", class_name).lower()
    return name or "model"
