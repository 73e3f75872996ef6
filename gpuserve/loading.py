"""Model loading: a model's settings to a warmed-up Handler on the probed device.

The steps, each logged: read the spec (file or inline), build the handler (the default one,
or the user's class named by `handler`), load the module through it (`sources` knows the file
formats and factories), warm it up, tune the batch cap, and check reduced precision.
"""

from __future__ import annotations

import logging
import time

from gpuserve.config import ModelSettings
from gpuserve.device import DeviceInfo
from gpuserve.errors import ModelLoadError
from gpuserve.handler import Handler, choose_batch_size
from gpuserve.sources import import_object
from gpuserve.spec import ModelSpec

logger = logging.getLogger("gpuserve.loading")


def load_model(settings: ModelSettings, device: DeviceInfo) -> Handler:
    """Load, place on `device`, and warm up. Every failure is a ModelLoadError with the reason."""
    try:
        source = settings.spec_source()
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    spec = ModelSpec.resolve(source, settings.key)
    handler = _handler_class(settings)(spec, device, settings)

    started = time.monotonic()
    handler.setup()
    size = ""
    if settings.path is not None and settings.path.is_file():
        size = f" ({settings.path.stat().st_size / 2**20:.1f} MiB)"
    logger.info(
        "loaded %s from %s%s on %s in %.2fs",
        spec.name,
        settings.path or settings.factory or settings.handler,
        size,
        device.device,
        time.monotonic() - started,
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


def _handler_class(settings: ModelSettings) -> type[Handler]:
    if settings.handler is None:
        return Handler
    found = import_object(settings.handler, settings.code_dir)
    if not (isinstance(found, type) and issubclass(found, Handler)):
        raise ModelLoadError(f"{settings.handler} is not a subclass of gpuserve.handler.Handler")
    return found
