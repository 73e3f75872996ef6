"""Device probe: which device to run on, and why.

`auto` picks the visible CUDA device with the most free memory (read through NVML, which sees
memory used by other processes too) and falls back to the CPU with a stated reason. An explicit
`cuda` or `cuda:N` that cannot be honoured is an error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any, Literal

from gpuserve.core.errors import DeviceError

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
    uuid: str | None = None
    # NVML's own free figure: total less used is larger by the driver's reserve (about half
    # a GiB on an H100 with driver 580), which no process can allocate.
    memory_free_bytes: int | None = None


class GpuMonitor:
    """Reads utilisation, memory, temperature and power of every GPU through NVML.

    NVML stays initialised between reads (initialising costs milliseconds). Where NVML is
    missing, `available` is False and `sample()` returns nothing, so no gauge is exported:
    absent, not zero.

    With `visible` (the CUDA devices' UUIDs, in CUDA's order: `visible_gpu_uuids()`), only
    those GPUs are read, each labelled with the CUDA index the server uses: NVML numbers GPUs
    in PCI order, CUDA fastest first, and the two differ on mixed hosts. Without it, every GPU
    NVML sees, by NVML's index (what `gpuserve probe` lists).
    """

    def __init__(self, visible: list[str | None] | None = None) -> None:
        self._nvml: ModuleType | None = None
        self.problem: str | None = None
        self._visible = visible
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
        handles: list[tuple[int, Any, str | None]]
        if self._visible is None:
            handles = [
                (index, nvml.nvmlDeviceGetHandleByIndex(index), None)
                for index in range(nvml.nvmlDeviceGetCount())
            ]
        else:
            by_uuid = _nvml_handles(nvml)
            handles = [
                (index, by_uuid[_plain_uuid(uuid)], uuid)
                for index, uuid in enumerate(self._visible)
                if uuid is not None and _plain_uuid(uuid) in by_uuid
            ]
        samples = []
        for index, handle, uuid in handles:
            memory = _read(memory_info, nvml, handle)
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
                    uuid=uuid,
                    memory_free_bytes=None if memory is None else int(memory.free),
                )
            )
        return samples

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None


def memory_info(nvml: ModuleType, handle: Any) -> Any:
    """NVML's memory reading, in its second version where the driver and library have it.

    Free memory is the same in both; the first counts the driver's own reserve as used (483
    MiB on an idle H100 with driver 580), the second apart, so `used` is the processes' alone.
    """
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is not None:
        with contextlib.suppress(Exception):  # older drivers lack the call
            return nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
    return nvml.nvmlDeviceGetMemoryInfo(handle)


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
        return _nvml_memory(torch, count), "NVML"
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


def visible_gpu_uuids() -> list[str | None]:
    """The UUID of each CUDA device torch sees, in CUDA's order (None where unknown)."""
    import torch

    if torch.version.cuda is None or not torch.cuda.is_available():
        return []
    return _cuda_uuids(torch, torch.cuda.device_count())


def _cuda_uuids(torch: ModuleType, count: int) -> list[str | None]:
    uuids: list[str | None] = []
    for index in range(count):
        try:
            uuids.append(str(torch.cuda.get_device_properties(index).uuid))
        except Exception:  # torch before 2.1 has no uuid
            uuids.append(None)
    return uuids


def _plain_uuid(uuid: str) -> str:
    """NVML writes `GPU-<uuid>` (or `MIG-<uuid>`), torch the bare uuid: compare the uuid."""
    uuid = uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        uuid = uuid.removeprefix(prefix)
    return uuid


def _nvml_handles(pynvml: ModuleType) -> dict[str, Any]:
    """Every NVML device, MIG instances included, by its plain UUID."""
    handles: dict[str, Any] = {}
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        with contextlib.suppress(Exception):
            handles[_plain_uuid(_text(pynvml.nvmlDeviceGetUUID(handle)))] = handle
        try:
            slots = pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)
        except Exception:  # no MIG on this GPU or this driver
            continue
        for slot in range(slots):
            with contextlib.suppress(Exception):
                mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
                handles[_plain_uuid(_text(pynvml.nvmlDeviceGetUUID(mig)))] = mig
    return handles


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_memory(torch: ModuleType, count: int) -> list[_Memory | None]:
    """Each torch device's memory from NVML, matched by UUID.

    Indices do not match: NVML counts GPUs in PCI order, CUDA fastest first (unless
    CUDA_DEVICE_ORDER=PCI_BUS_ID), so on a mixed host index N is two different GPUs. A device
    whose UUID NVML does not know gets None (free memory unknown), rather than a CUDA context
    made on every GPU to ask. Only where torch gives no UUIDs at all does CUDA_VISIBLE_DEVICES
    map indices, as before.
    """
    pynvml = _import_pynvml()
    pynvml.nvmlInit()
    try:
        uuids = _cuda_uuids(torch, count)
        if all(uuid is None for uuid in uuids):
            handles = [_handle_by_visible_id(pynvml, ident) for ident in _visible_ids(count)]
        else:
            by_uuid = _nvml_handles(pynvml)
            handles = [None if u is None else by_uuid.get(_plain_uuid(u)) for u in uuids]
        memory: list[_Memory | None] = []
        for handle in handles:
            info = None if handle is None else memory_info(pynvml, handle)
            memory.append(None if info is None else _Memory(int(info.free), int(info.total)))
        return memory
    finally:
        pynvml.nvmlShutdown()


def _handle_by_visible_id(pynvml: ModuleType, ident: str) -> Any:
    if ident.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(ident))
    if ident.startswith("GPU-"):
        return pynvml.nvmlDeviceGetHandleByUUID(ident)
    return None  # MIG instances and short UUIDs: no simple mapping


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


def passes_share_cores(devices: Sequence[DeviceInfo], copies: int, cores: int) -> bool:
    """Whether a model's forward passes compete with the event loop for the same cores: every
    copy is on the CPU, and their torch threads fill the `cores` the process may use.

    Then nothing gains from preparing the next batch while a pass runs (the batcher's
    `overlap`), and handing it over early only splits the callers into smaller batches.
    """
    if not devices or any(device.kind != "cpu" for device in devices):
        return False
    import torch

    return torch.get_num_threads() * copies >= cores


def release_memory() -> None:
    """After a model is unloaded: collect what it left in reference cycles, and hand the
    blocks torch's CUDA allocator keeps cached back to the device.

    gc.freeze() (freeze_gc) exempts what was alive at load from collection, the unloaded
    model's objects included; they are unfrozen for this collection and the survivors
    frozen again.
    """
    import torch

    frozen = gc.get_freeze_count() > 0
    gc.unfreeze()
    gc.collect()
    if frozen:
        gc.freeze()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
