"""Device probe: which device to run on, and why.

`auto` picks the visible CUDA device with the most free memory (read through NVML, which sees
memory used by other processes too) and falls back to the CPU with a stated reason. An explicit
`cuda` or `cuda:N` that cannot be honoured is an error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any, Literal

from gpuserve.errors import DeviceError

_GIB = 1024**3


@dataclass(frozen=True)
class DeviceInfo:
    """What the probe found. `device` is what torch takes (`cpu`, `cuda:1`)."""

    device: str
    kind: Literal["cpu", "cuda"]
    name: str
    reason: str
    index: int | None = None
    total_memory_bytes: int | None = None
    free_memory_bytes: int | None = None
    torch_version: str = ""
    cuda_version: str | None = None
    visible_devices: int = 0  # CUDA devices torch can see

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Memory:
    free: int
    total: int


@functools.lru_cache(maxsize=8)
def probe(prefer: str = "auto") -> DeviceInfo:
    """Probe once per `prefer` value and cache the answer. `probe.cache_clear()` forgets it.

    `all` answers like `auto` (the best device); the caller places copies on the rest.
    """
    import torch

    if prefer == "all":
        return probe("auto")
    if prefer == "cpu":
        return _cpu("cpu was requested", torch.__version__)
    if prefer not in ("auto", "cuda") and not prefer.startswith("cuda:"):
        raise DeviceError(f"unknown device {prefer!r}: use auto, cpu, cuda or cuda:N")

    unavailable = _cuda_unavailable_reason(torch)
    if unavailable is not None:
        if prefer == "auto":
            return _cpu(f"no usable CUDA device: {unavailable}", torch.__version__)
        raise DeviceError(f"device {prefer!r} was requested but {unavailable}")

    count = torch.cuda.device_count()
    memory, memory_source = _memory_per_device(torch, count)
    if prefer.startswith("cuda:"):
        index = int(prefer.split(":", 1)[1])
        if index >= count:
            raise DeviceError(
                f"device {prefer!r} was requested but only {count} CUDA device(s) are visible"
                f"{_visible_note()}"
            )
        reason = f"{prefer} was requested"
    else:
        index = _most_free(memory)
        reason = _choice_reason(index, memory, count, memory_source)

    mem = memory[index]
    return DeviceInfo(
        device=f"cuda:{index}",
        kind="cuda",
        name=torch.cuda.get_device_name(index),
        reason=reason,
        index=index,
        total_memory_bytes=mem.total if mem else None,
        free_memory_bytes=mem.free if mem else None,
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        visible_devices=count,
    )


@dataclass(frozen=True)
class GpuSample:
    """One reading of one GPU's NVML gauges; None where this GPU does not report one."""

    index: int
    name: str
    utilization: float | None  # share of the last sample period a kernel ran, 0..1
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    temperature_celsius: float | None
    power_watts: float | None


class GpuMonitor:
    """Reads utilisation, memory, temperature and power of every GPU through NVML.

    NVML stays initialised between reads (initialising costs milliseconds). Where NVML is
    missing, `available` is False and `sample()` returns nothing, so no gauge is exported:
    absent, not zero.
    """

    def __init__(self) -> None:
        self._nvml: ModuleType | None = None
        self.problem: str | None = None
        try:
            nvml = _import_pynvml()
            nvml.nvmlInit()
        except Exception as exc:
            self.problem = _describe_nvml_error(exc)
            return
        self._nvml = nvml

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def sample(self) -> list[GpuSample]:
        """Read every GPU now. Blocking (NVML calls take microseconds to milliseconds)."""
        nvml = self._nvml
        if nvml is None:
            return []
        samples = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = _read(nvml.nvmlDeviceGetMemoryInfo, handle)
            rates = _read(nvml.nvmlDeviceGetUtilizationRates, handle)
            temperature = _read(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
            power_mw = _read(nvml.nvmlDeviceGetPowerUsage, handle)
            name = _read(nvml.nvmlDeviceGetName, handle)
            utilization = None if rates is None else rates.gpu
            samples.append(
                GpuSample(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name or f"gpu{index}"),
                    utilization=None if utilization is None else utilization / 100.0,
                    memory_used_bytes=None if memory is None else int(memory.used),
                    memory_total_bytes=None if memory is None else int(memory.total),
                    temperature_celsius=None if temperature is None else float(temperature),
                    power_watts=None if power_mw is None else power_mw / 1000.0,
                )
            )
        return samples

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None


def _read(call: Callable[..., Any], *args: Any) -> Any:
    # GPUs differ in what they report (no power reading on some); a missing gauge is None.
    try:
        return call(*args)
    except Exception:
        return None


def _cuda_unavailable_reason(torch: ModuleType) -> str | None:
    if torch.version.cuda is None:
        build = f"torch {torch.__version__} is a CPU-only build"
        nvml_problem = _nvml_problem()
        if nvml_problem is None:
            return f"{build}, though NVML sees a GPU: install a CUDA build of torch"
        return f"{build}, and {nvml_problem}"
    if torch.cuda.is_available():
        return None
    # torch says no; NVML usually knows the more precise reason (no driver at all, say).
    nvml_problem = _nvml_problem()
    if nvml_problem is not None:
        return nvml_problem
    return f"torch.cuda.is_available() is False{_visible_note()}"


def _nvml_problem() -> str | None:
    try:
        pynvml = _import_pynvml()
        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:
        return _describe_nvml_error(exc)
    return None if count else "NVML reports no NVIDIA GPU"


def _describe_nvml_error(exc: Exception) -> str:
    if type(exc).__name__ == "NVMLError_LibraryNotFound":
        return "the NVIDIA driver library (NVML) was not found"
    if type(exc).__name__ == "NVMLError_DriverNotLoaded":
        return "the NVIDIA driver is not loaded"
    return f"NVML failed: {type(exc).__name__}: {exc}"


def _import_pynvml() -> ModuleType:
    # Imported lazily so tests can swap it and a CPU box never loads it unless it probes.
    import pynvml

    return pynvml


def _visible_note() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible!r})"


def _memory_per_device(torch: ModuleType, count: int) -> tuple[list[_Memory | None], str]:
    """Free and total memory for each torch-visible device, by NVML if it works, else torch."""
    try:
        return _nvml_memory(count), "NVML"
    except Exception as exc:
        nvml_error = _describe_nvml_error(exc)
    memory: list[_Memory | None] = []
    for index in range(count):
        try:
            free, total = torch.cuda.mem_get_info(index)
            memory.append(_Memory(free=int(free), total=int(total)))
        except Exception:
            memory.append(None)
    return memory, f"torch.cuda.mem_get_info ({nvml_error})"


def _nvml_memory(count: int) -> list[_Memory | None]:
    """Map torch's logical indices to NVML handles through CUDA_VISIBLE_DEVICES."""
    pynvml = _import_pynvml()
    pynvml.nvmlInit()
    try:
        ids = _visible_ids(count)
        memory: list[_Memory | None] = []
        for ident in ids:
            if ident.isdigit():
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(ident))
            elif ident.startswith("GPU-"):
                handle = pynvml.nvmlDeviceGetHandleByUUID(ident)
            else:  # MIG instances and the like: NVML cannot map them simply.
                raise RuntimeError(f"cannot map CUDA_VISIBLE_DEVICES entry {ident!r} to NVML")
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            memory.append(_Memory(free=int(info.free), total=int(info.total)))
        return memory
    finally:
        pynvml.nvmlShutdown()


def _visible_ids(count: int) -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in range(count)]
    ids = [part.strip() for part in visible.split(",") if part.strip()]
    return ids[:count]


def _most_free(memory: list[_Memory | None]) -> int:
    known = [(m.free, -i) for i, m in enumerate(memory) if m is not None]
    return -max(known)[1] if known else 0


def _choice_reason(index: int, memory: list[_Memory | None], count: int, memory_source: str) -> str:
    mem = memory[index]
    if count == 1:
        return "the only visible CUDA device"
    if mem is None:
        return f"first of {count} visible CUDA devices (free memory unknown: {memory_source})"
    return (
        f"most free memory of {count} visible CUDA devices: "
        f"{mem.free / _GIB:.1f} of {mem.total / _GIB:.1f} GiB free (from {memory_source})"
    )


def _cpu(reason: str, torch_version: str) -> DeviceInfo:
    return DeviceInfo(
        device="cpu",
        kind="cpu",
        name=_cpu_name(),
        reason=reason,
        total_memory_bytes=_total_ram(),
        torch_version=torch_version,
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _total_ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
