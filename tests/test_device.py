"""Device probe with torch.cuda and NVML mocked: every branch runs here, on a CPU-only machine."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from gpuserve.core.errors import DeviceError
from gpuserve.model import device
from gpuserve.model.device import DeviceInfo, probe

GIB = 1024**3


class NVMLError_LibraryNotFound(Exception):
    pass


class FakeNVML:
    """The few pynvml calls the probe makes, over a list of (uuid, free, total) per GPU."""

    def __init__(self, gpus: list[tuple[str, int, int]]) -> None:
        self.gpus = gpus

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        return [g[0] for g in self.gpus].index(uuid)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        _, free, total = self.gpus[handle]
        return SimpleNamespace(free=free, total=total, used=total - free)


class MissingNVML:
    def nvmlInit(self) -> None:
        raise NVMLError_LibraryNotFound("libnvidia-ml.so.1 not found")


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    probe.cache_clear()
    yield
    probe.cache_clear()


def fake_cuda(
    monkeypatch: pytest.MonkeyPatch, count: int, nvml: Any, available: bool = True
) -> None:
    """Make this CPU torch look like a CUDA build that sees `count` devices."""
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available and count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"Fake GPU {i}")
    monkeypatch.setattr(device, "_import_pynvml", lambda: nvml)


def test_this_cpu_only_torch_falls_back_to_cpu_and_says_why() -> None:
    info = probe("auto")
    assert info.device == "cpu" and info.kind == "cpu"
    assert "CPU-only build" in info.reason


def test_cpu_only_torch_on_a_gpu_machine_says_to_install_a_cuda_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(device, "_import_pynvml", lambda: FakeNVML([("GPU-a", GIB, 2 * GIB)]))
    info = probe("auto")
    assert info.device == "cpu"
    assert "install a CUDA build" in info.reason


def test_no_driver_falls_back_to_cpu_naming_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 0, MissingNVML(), available=False)
    info = probe("auto")
    assert info.device == "cpu"
    assert "NVML" in info.reason and "not found" in info.reason


def test_auto_picks_the_gpu_with_the_most_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(
        monkeypatch, 2, FakeNVML([("GPU-a", 2 * GIB, 80 * GIB), ("GPU-b", 70 * GIB, 80 * GIB)])
    )
    info = probe("auto")
    assert info.device == "cuda:1" and info.index == 1
    assert info.name == "Fake GPU 1"
    assert info.free_memory_bytes == 70 * GIB and info.total_memory_bytes == 80 * GIB
    assert "most free memory of 2" in info.reason


def test_cuda_visible_devices_maps_logical_to_physical_indices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Physical GPU 2 has the most memory; it is torch's cuda:0 once reordered.
    gpus = [
        ("GPU-a", 10 * GIB, 80 * GIB),
        ("GPU-b", 20 * GIB, 80 * GIB),
        ("GPU-c", 60 * GIB, 80 * GIB),
    ]
    fake_cuda(monkeypatch, 2, FakeNVML(gpus))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    info = probe("auto")
    assert info.device == "cuda:0"
    assert info.free_memory_bytes == 60 * GIB


def test_cuda_visible_devices_by_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [("GPU-a", 50 * GIB, 80 * GIB), ("GPU-b", 5 * GIB, 80 * GIB)]
    fake_cuda(monkeypatch, 1, FakeNVML(gpus))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-b")
    info = probe("auto")
    assert info.device == "cuda:0"
    assert info.free_memory_bytes == 5 * GIB
    assert info.reason == "the only visible CUDA device"


def test_nvml_failure_falls_back_to_torch_memory_query(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 2, MissingNVML())
    free = {0: 30 * GIB, 1: 3 * GIB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], 40 * GIB))
    info = probe("auto")
    assert info.device == "cuda:0"
    assert "torch.cuda.mem_get_info" in info.reason


def test_explicit_cuda_without_a_gpu_is_an_error() -> None:
    with pytest.raises(DeviceError, match="'cuda' was requested"):
        probe("cuda")


def test_explicit_cuda_index_out_of_range_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 2, FakeNVML([("GPU-a", GIB, GIB), ("GPU-b", GIB, GIB)]))
    with pytest.raises(DeviceError, match="only 2 CUDA device"):
        probe("cuda:5")


def test_explicit_cuda_index_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 2, FakeNVML([("GPU-a", 9 * GIB, 10 * GIB), ("GPU-b", GIB, 10 * GIB)]))
    info = probe("cuda:1")
    assert info.device == "cuda:1"
    assert info.reason == "cuda:1 was requested"


def test_cpu_is_honoured_and_the_answer_is_cached() -> None:
    first = probe("cpu")
    assert first.device == "cpu" and first.reason == "cpu was requested"
    assert probe("cpu") is first
    assert first.to_dict()["device"] == "cpu"


def test_unknown_device_is_an_error() -> None:
    with pytest.raises(DeviceError, match="unknown device"):
        probe("tpu")


class GaugeNVML(FakeNVML):
    """FakeNVML plus the gauges the monitor reads; GPU 1 gives no power reading."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self) -> None:
        super().__init__([("GPU-a", 30 * GIB, 80 * GIB), ("GPU-b", 70 * GIB, 80 * GIB)])
        self.shut = False

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        # As NVML's v2 reading: the driver's reserve is neither used nor free.
        _, free, total = self.gpus[handle]
        return SimpleNamespace(free=free, total=total, used=total - free - GIB // 2)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=[90, 5][handle], memory=0)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return [61, 40][handle]

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        if handle == 1:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return 312_500  # milliwatts

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"Fake H100"

    def nvmlShutdown(self) -> None:
        self.shut = True


def test_the_gpu_monitor_reads_each_gauge_and_skips_what_a_gpu_lacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nvml = GaugeNVML()
    monkeypatch.setattr(device, "_import_pynvml", lambda: nvml)
    monitor = device.GpuMonitor()
    first, second = monitor.sample()
    assert (first.name, first.utilization, first.temperature_celsius) == ("Fake H100", 0.9, 61.0)
    assert first.memory_used_bytes == 49.5 * GIB and first.memory_total_bytes == 80 * GIB
    assert first.memory_free_bytes == 30 * GIB  # NVML's figure, not total less used
    assert first.power_watts == 312.5
    assert second.index == 1 and second.power_watts is None and second.utilization == 0.05
    monitor.close()
    assert nvml.shut and monitor.sample() == []


class ReservingNVML(GaugeNVML):
    """NVML with the second memory reading: the first counts the driver's reserve as used."""

    nvmlMemory_v2 = 0x2000028
    RESERVED = GIB // 2

    def __init__(self, v2_works: bool = True) -> None:
        super().__init__()  # GPU-a: 30 GiB free of 80; GPU-b: 70 of 80
        self.v2_works = v2_works

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: int | None = None) -> Any:
        _, free, total = self.gpus[handle]
        if version is None:
            return SimpleNamespace(free=free, total=total, used=total - free)
        if not self.v2_works:
            raise RuntimeError("NVML_ERROR_FUNCTION_NOT_FOUND")  # an older driver
        assert version == self.nvmlMemory_v2
        used = total - free - self.RESERVED
        return SimpleNamespace(free=free, total=total, used=used, reserved=self.RESERVED)


def test_used_memory_leaves_out_what_the_driver_reserves(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = ReservingNVML()
    fake_cuda(monkeypatch, 2, nvml)
    assert probe("auto").free_memory_bytes == 70 * GIB
    first, _ = device.GpuMonitor().sample()
    assert first.memory_free_bytes == 30 * GIB and first.memory_used_bytes == 49.5 * GIB


def test_where_the_driver_lacks_the_second_reading_the_first_is_used() -> None:
    nvml = ReservingNVML(v2_works=False)
    assert device.memory_info(nvml, 0).used == 50 * GIB  # the reserve counted in


def test_without_nvml_the_monitor_has_nothing_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(device, "_import_pynvml", lambda: MissingNVML())
    monitor = device.GpuMonitor()
    assert not monitor.available and monitor.sample() == []
    assert monitor.problem == "the NVIDIA driver library (NVML) was not found"


def test_all_probes_like_auto_and_counts_the_visible_devices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_cuda(
        monkeypatch, 2, FakeNVML([("GPU-a", 10 * GIB, 80 * GIB), ("GPU-b", 70 * GIB, 80 * GIB)])
    )
    info = probe("all")
    assert info == probe("auto") and info.device == "cuda:1" and info.visible_devices == 2


class UuidNVML(GaugeNVML):
    """NVML in PCI order: GPU-a (busy) is NVML's 0, GPU-b (idle) NVML's 1; a MIG instance
    hangs off GPU-b."""

    def nvmlDeviceGetUUID(self, handle: Any) -> bytes:
        if handle == "mig":
            return b"MIG-c"
        return self.gpus[handle][0].encode()

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: int) -> int:
        if handle == 0:
            raise RuntimeError("not supported")
        return 1

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: int, slot: int) -> str:
        return "mig"

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        if handle == "mig":
            return SimpleNamespace(free=5 * GIB, total=10 * GIB, used=5 * GIB)
        return super().nvmlDeviceGetMemoryInfo(handle)


def cuda_ordered(monkeypatch: pytest.MonkeyPatch, uuids: list[str]) -> UuidNVML:
    """torch sees the GPUs fastest first: the reverse of NVML's PCI order here."""
    nvml = UuidNVML()
    fake_cuda(monkeypatch, len(uuids), nvml)
    props = [SimpleNamespace(uuid=u) for u in uuids]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    return nvml


def test_auto_matches_cuda_devices_to_nvml_by_uuid_not_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # cuda:0 is GPU-b (70 GiB free) although NVML's index 0 is GPU-a (30 GiB free).
    cuda_ordered(monkeypatch, ["b", "a"])
    info = probe("auto")
    assert info.device == "cuda:0" and info.free_memory_bytes == 70 * GIB


def test_a_mig_instance_is_found_by_its_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda_ordered(monkeypatch, ["MIG-c"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: pytest.fail("made a CUDA context"))
    info = probe("auto")
    assert info.free_memory_bytes == 5 * GIB


def test_an_unknown_uuid_leaves_free_memory_unknown_without_a_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda_ordered(monkeypatch, ["zzz", "a"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: pytest.fail("made a CUDA context"))
    info = probe("auto")
    assert info.device == "cuda:1" and info.free_memory_bytes == 30 * GIB


def test_gauges_cover_only_the_servers_gpus_by_their_cuda_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nvml = UuidNVML()
    monkeypatch.setattr(device, "_import_pynvml", lambda: nvml)
    monitor = device.GpuMonitor(visible=["GPU-b"])  # this server sees one GPU, as cuda:0
    (sample,) = monitor.sample()
    assert (sample.index, sample.uuid) == (0, "GPU-b")
    assert sample.memory_free_bytes == 70 * GIB  # GPU-b's, not NVML index 0's
    everyone = device.GpuMonitor().sample()
    assert [s.index for s in everyone] == [0, 1]
    monitor.close()


def test_passes_share_the_cores_when_cpu_copies_threads_fill_them() -> None:
    threads = torch.get_num_threads()
    cpu = DeviceInfo(device="cpu", kind="cpu", name="c", reason="test")
    gpu = DeviceInfo(device="cuda:0", kind="cuda", name="g", reason="test", index=0)
    assert device.passes_share_cores([cpu], copies=1, cores=threads)
    assert device.passes_share_cores([cpu], copies=2, cores=2 * threads)
    assert not device.passes_share_cores([cpu], copies=1, cores=threads + 1)
    # A GPU computes beside the event loop, however few the cores.
    assert not device.passes_share_cores([gpu], copies=1, cores=1)
    assert not device.passes_share_cores([cpu, gpu], copies=2, cores=1)
