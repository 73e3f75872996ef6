"""Model loading: a file on disk plus its spec, to a warmed-up Handler on the probed device.

Formats, chosen by the file's suffix:
- `.pt2`: a `torch.export` program (`torch.export.save`), the format torch recommends now.
- `.pt`, `.ts`, `.torchscript`: a TorchScript module (`torch.jit.save`), for existing models.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import torch

from gpuserve.config import ModelSettings
from gpuserve.device import DeviceInfo
from gpuserve.errors import ModelLoadError
from gpuserve.handler import Handler, choose_batch_size
from gpuserve.spec import ModelSpec

logger = logging.getLogger("gpuserve.loading")

_EXPORT_SUFFIXES = {".pt2"}
_TORCHSCRIPT_SUFFIXES = {".pt", ".ts", ".torchscript"}


def load_model(settings: ModelSettings, device: DeviceInfo) -> Handler:
    """Load, place on `device`, and warm up. Every failure is a ModelLoadError with the reason."""
    spec = ModelSpec.from_file(settings.spec_path)
    if settings.name is not None:
        spec = spec.model_copy(update={"name": settings.name})
    path = settings.path
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")

    started = time.monotonic()
    module = _load_module(path, device)
    handler = Handler(module, spec, device, settings.precision)
    loaded_s = time.monotonic() - started
    logger.info(
        "loaded %s from %s (%.1f MiB) on %s in %.2fs",
        spec.name,
        path,
        path.stat().st_size / 2**20,
        device.device,
        loaded_s,
    )
    if settings.warmup:
        started = time.monotonic()
        handler.warm_up(settings.warmup_batch_sizes)
        logger.info(
            "warmed up %s at batch sizes %s in %.2fs",
            spec.name,
            list(settings.warmup_batch_sizes),
            time.monotonic() - started,
        )
    if settings.warmup and settings.tune_batch_size and settings.max_batch_size > 1:
        rates = handler.measure_batch_sizes(settings.warmup_batch_sizes)
        handler.preferred_batch_size = choose_batch_size(rates)
        logger.info(
            "%s throughput by batch size (instances/s): %s; batches capped at %d",
            spec.name,
            {size: round(rate) for size, rate in rates.items()},
            handler.preferred_batch_size,
        )
    if settings.precision != "fp32":
        error = handler.check_precision(settings.precision_tolerance)
        logger.info(
            "%s in %s: largest difference from fp32 is %.4f of the output's scale",
            spec.name,
            settings.precision,
            error,
        )
    return handler


def _load_module(path: Path, device: DeviceInfo) -> torch.nn.Module:
    suffix = path.suffix.lower()
    try:
        if suffix in _EXPORT_SUFFIXES:
            program = torch.export.load(str(path))
            module: torch.nn.Module = program.module()
            return module.to(device.device)
        if suffix in _TORCHSCRIPT_SUFFIXES:
            with warnings.catch_warnings():
                # TorchScript is deprecated in torch, but users still hold such files.
                warnings.simplefilter("ignore", DeprecationWarning)
                scripted: torch.nn.Module = torch.jit.load(str(path), map_location=device.device)
            # An exported program is frozen in the mode it was exported in; a script is not.
            return scripted.eval()
    except Exception as exc:
        raise ModelLoadError(
            f"could not load {path} as {_format_name(suffix)}: {type(exc).__name__}: {exc}"
        ) from exc
    known = ", ".join(sorted(_EXPORT_SUFFIXES | _TORCHSCRIPT_SUFFIXES))
    raise ModelLoadError(f"unknown model format {suffix!r} for {path}: use one of {known}")


def _format_name(suffix: str) -> str:
    return "a torch.export program" if suffix in _EXPORT_SUFFIXES else "a TorchScript module"
