"""Settings: one class, read from a TOML file, then `GPUSERVE_*` environment variables, then flags.

Nothing is read at import time. `Settings()` reads the environment when it is built, and the
file named by `config_file` (given as a flag, or as `GPUSERVE_CONFIG_FILE`) at the same moment.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from gpuserve.model.layout import model_in_folder
from gpuserve.spec import ModelSpec

_DEVICE_PATTERN = re.compile(r"^(auto|all|cpu|cuda|cuda:\d+)$")
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_IMPORT_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"


def valid_name(name: str) -> bool:
    """Whether `name` has a model name's form: no separators, no dot first."""
    return re.fullmatch(_NAME_PATTERN, name) is not None


class ModelSettings(BaseModel):
    """Which model to serve, where it comes from, and how to batch its requests.

    The source is a file (`path`: .pt2 or TorchScript), or a factory (`factory`, a
    `module:callable` returning a torch module) with optional `weights`, or a user `handler`
    class whose `load` hook builds the model itself.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = Field(
        default=None,
        pattern=_NAME_PATTERN,
        description="The name clients use (/models/{name}/predict). Default: the file's stem.",
    )
    version: int = Field(
        default=1,
        ge=1,
        description="The model's version (/v2/models/{name}/versions/{version}/...). Several "
        "versions of one name are served side by side; routes without a version serve the "
        "highest one ready, or the server's `default_versions` entry.",
    )
    path: Path | None = Field(
        default=None,
        description="The model file: .pt2 (torch.export) or TorchScript. Relative paths in a "
        "config file are taken from the file's folder; from a flag or the environment, from "
        "the working directory. gpuserve names no model of its own: `serve` refuses to start "
        "without one (a path, a factory or a handler).",
    )
    factory: str | None = Field(
        default=None,
        pattern=_IMPORT_PATTERN,
        description="'package.module:callable' returning a torch.nn.Module, instead of a file.",
    )
    factory_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for the factory."
    )
    weights: Path | None = Field(
        default=None,
        description="A state dict for the factory's module: .safetensors, or .pt/.pth "
        "(read with torch.load(weights_only=True)).",
    )
    handler: str | None = Field(
        default=None,
        pattern=_IMPORT_PATTERN,
        description="'package.module:Class', a gpuserve.handler.Handler subclass with this "
        "model's own hooks.",
    )
    code_dir: Path | None = Field(
        default=None,
        description="A directory to import `factory` and `handler` from (added to sys.path). "
        "Default: the working directory.",
    )
    spec: Path | dict[str, Any] | None = Field(
        default=None,
        description="The spec (input and output shapes, dtypes, labels): a JSON file, or the "
        "same keys inline. Default: the model path with a .json suffix.",
    )
    device: str | None = Field(
        default=None,
        description="Pins this model to a device (cpu, cuda:N), or `all`: a copy on every "
        "visible GPU. Default: the server's device.",
    )
    instances_per_device: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Copies of the model per device, each with its own worker thread; each "
        "batch goes to the least loaded copy. More than 1 helps small models on big GPUs.",
    )
    length_buckets: list[int] | None = Field(
        default=None,
        description="For inputs with a variable dimension: batches only hold instances of the "
        "same bucket (the first bound at or above the instance's length), and are padded up "
        "to that bound, so one long instance does not pad a batch of short ones.",
    )
    max_batch_size: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="The most instances one forward pass takes (tune_batch_size may cap "
        "batches lower); a request of more instances is split across passes.",
    )
    max_wait_ms: float = Field(
        default=2.0,
        ge=0.0,
        le=10_000.0,
        description="How long a batch may keep growing while the model is busy, or, once it is "
        "free, while the callers of the last batch are due back. A lone request to an idle "
        "model is dispatched at once, never on this timer. A model on a CPU whose cores its "
        "passes fill lets a batch grow until it is free, whatever this says.",
    )
    hold_for_callers: bool = Field(
        default=True,
        description="An idle model holds a batch open for the callers of the last batch still "
        "due back (clients that send their next request once answered), for one pass or as "
        "long as they take to come back at their recent pace, within max_wait_ms: full "
        "batches rather than halves under a steady crowd; and, while "
        "calls stream in one at a time (gRPC), until they pause, within max_wait_ms. False: "
        "dispatch at once, for independent arrivals where the hold only adds wait.",
    )
    completion_thread: bool = Field(
        default=True,
        description="On a GPU, a thread of its own waits for each batch's output and answers "
        "it, while the model's worker goes on launching the next batch (up to three in "
        "flight). False: the worker waits for each output itself.",
    )
    max_instances_per_request: int = Field(
        default=1024,
        ge=1,
        description="Instances one request may carry; past this it is refused as invalid "
        "input (422 on /predict and v1, 400 on v2, INVALID_ARGUMENT over gRPC).",
    )
    max_queue_size: int = Field(
        default=2048,
        ge=1,
        description="Instances that may wait for a batch; past it requests get 503 at once.",
    )
    priority_levels: int = Field(
        default=0,
        ge=0,
        le=16,
        description="Priority levels, as Triton's: a request may ask for level 1 (the highest) "
        "to N (the `priority` parameter, or X-Priority on /predict), and batches are filled "
        "from the highest level first. 0: no priorities (a request's priority is refused).",
    )
    default_priority_level: int | None = Field(
        default=None,
        ge=1,
        description="With priority_levels, the level of a request that names none. Default: "
        "the lowest (priority_levels).",
    )
    request_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Deadline of a request, queue and forward pass included: 504 past it. "
        "A client may ask for less with the X-Request-Timeout-Ms header.",
    )
    forward_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="A forward pass running longer marks the model unavailable (503) until it "
        "returns, and fails the requests waiting for it.",
    )
    oom_cooldown_s: float = Field(
        default=30.0,
        ge=0,
        description="After running out of memory, how long batches stay capped at half size.",
    )
    warmup: bool = Field(
        default=True,
        description="Before reporting ready, run one batch of each power-of-two size up to "
        "max_batch_size, and check the output shape against the spec.",
    )
    tune_batch_size: bool = Field(
        default=True,
        description="At load, time each warm-up batch size and cap batches at the smallest "
        "one within 1% (the timing noise) of the best throughput, when that is below "
        "max_batch_size.",
    )
    precision: Literal["fp32", "fp16", "bf16", "fp16-weights", "bf16-weights"] = Field(
        default="fp32",
        description="Compute precision of the forward pass: fp16 or bf16 under torch.autocast "
        "(the fp32 weights kept), or fp16-weights or bf16-weights, the weights cast once at "
        "load (no per-pass re-cast; for GPUs). Either way checked against fp32 at load.",
    )
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        default="off",
        description="torch.compile the model in this mode (reduce-overhead: CUDA graphs). "
        "Batches are then padded up to the next warm-up size, so each size compiles once, "
        "at warm-up, and never while serving.",
    )
    compile_backend: str = Field(
        default="inductor", description="The torch.compile backend (eager: for tests)."
    )
    compile_cache_dir: Path | None = Field(
        default=None,
        description="A folder for torch's compile caches (inductor's compiled graphs and "
        "kernels), kept between starts: a compiled model's second start on the same machine "
        "reuses them instead of compiling again (mount a volume here in a container). torch "
        "keeps one such folder per process, so give every compiled model of a server the same "
        "one. Default: torch's own, under the system's temporary folder.",
    )
    precision_tolerance: float = Field(
        default=0.02,
        gt=0,
        description="At load, fp16/bf16 outputs may differ from fp32 by at most this share of "
        "the fp32 output's largest magnitude, or the load fails.",
    )
    freeze_gc: bool = Field(
        default=True,
        description="After loading, exempt the objects alive then from garbage collection, "
        "which otherwise stalls the event loop for 100 ms and more under load.",
    )
    offload_hooks: bool = Field(
        default=False,
        description="Run the handler's preprocess and postprocess hooks in a thread pool "
        "instead of on the event loop: for heavy ones (a tokenizer, image decoding), which "
        "would otherwise stall every other request. Costs a thread hand-off per request.",
    )

    @property
    def warmup_batch_sizes(self) -> tuple[int, ...]:
        """Powers of two up to max_batch_size, and max_batch_size itself."""
        sizes = {
            1 << i for i in range(self.max_batch_size.bit_length()) if 1 << i <= self.max_batch_size
        }
        return tuple(sorted(sizes | {self.max_batch_size}))

    @property
    def title(self) -> str:
        """The name and, past version 1, the version: how logs name this model."""
        return self.key if self.version == 1 else f"{self.key} v{self.version}"

    @property
    def key(self) -> str:
        """The name the model is served under."""
        if self.name is not None:
            return self.name
        if self.path is not None:
            return self.path.stem
        raise ValueError("a model without a file needs a name")

    @model_validator(mode="before")
    @classmethod
    def _model_in_a_folder(cls, data: Any) -> Any:
        """A path that is a folder (KServe's /mnt/models, say) names the model it holds: its
        one model file, or the highest version of a one-model Triton repository, whose
        folder names the model unless `name` does."""
        if not isinstance(data, dict) or data.get("path") is None:
            return data
        folder = Path(data["path"])
        if folder.name in ("", ".", "..") or not folder.is_dir():
            return data
        try:
            found = model_in_folder(folder)
        except ValueError:
            return data  # `path`'s own check says why, as that setting's error
        resolved = {**data, "path": found.path}
        if found.name is not None and data.get("name") is None:
            resolved["name"] = found.name
        if found.version is not None and data.get("version") is None:
            resolved["version"] = found.version
        return resolved

    @field_validator("path")
    @classmethod
    def _check_path(cls, path: Path | None) -> Path | None:
        if path is not None and path.name in ("", ".", ".."):
            raise ValueError(f"path must name a model file, not {str(path)!r}")
        if path is not None and path.is_dir():
            model_in_folder(path)  # a folder that holds no single model: ValueError, why
        return path

    @model_validator(mode="after")
    def _check_source(self) -> ModelSettings:
        if self.factory is not None and self.path is not None:
            raise ValueError("give either path (a model file) or factory, not both")
        if self.weights is not None and self.factory is None:
            raise ValueError("weights need a factory that builds the module to load them into")
        if self.path is None and self.factory is None and self.handler is None:
            raise ValueError("a model needs a path, a factory or a handler")
        if self.name is None and self.path is None:
            raise ValueError("a model built by a factory or handler needs a name")
        if self.device is not None:
            object.__setattr__(self, "device", _check_device(self.device))
        if self.default_priority_level is not None and not (
            1 <= self.default_priority_level <= self.priority_levels
        ):
            raise ValueError(
                f"default_priority_level must be a level from 1 to priority_levels "
                f"({self.priority_levels}), not {self.default_priority_level}"
            )
        if self.length_buckets is not None and (
            not self.length_buckets
            or self.length_buckets != sorted(set(self.length_buckets))
            or self.length_buckets[0] < 1
        ):
            raise ValueError("length_buckets must be positive and strictly increasing")
        if isinstance(self.spec, dict):
            # Check an inline spec now, so a typo fails at start-up, not in the load thread.
            try:
                ModelSpec.model_validate({"name": self.key, **self.spec})
            except ValidationError as exc:
                raise ValueError(f"inline spec: {exc}") from None
        return self

    def spec_source(self) -> Path | dict[str, Any]:
        """The spec's file, or its inline keys."""
        if self.spec is not None:
            return self.spec
        if self.path is None:
            raise ValueError(f"model {self.key!r} needs a spec: a file or inline keys")
        return self.path.with_suffix(".json")


class RaySettings(BaseModel):
    """How `gpuserve.ray_serve` sizes its Ray Serve deployment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_gpus: float = Field(default=1.0, ge=0, description="GPUs per replica (0 on CPU).")
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs per replica.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each replica needs."
    )
    num_replicas: int | None = Field(
        default=None, ge=1, description="A fixed replica count; unset: autoscale."
    )
    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas when autoscaling.")
    max_replicas: int = Field(default=4, ge=1, description="Most replicas when autoscaling.")
    target_ongoing_requests: float = Field(
        default=32,
        gt=0,
        description="Ray adds replicas when requests in progress per replica pass this: about "
        "one full batch, so batches stay full before another replica costs a model load.",
    )
    max_ongoing_requests: int = Field(
        default=256,
        ge=1,
        description="Requests Ray sends one replica at once; beyond it they wait in Ray's "
        "proxy. Above max_batch_size, so batches can fill.",
    )


class Settings(BaseSettings):
    """Every setting of a gpuserve process. Build it once (see `cli`) and pass it down."""

    model_config = SettingsConfigDict(
        env_prefix="GPUSERVE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        # An error must never echo what it was given: the input may hold the API keys.
        hide_input_in_errors=True,
    )

    config_file: Path | None = Field(default=None, description="TOML file with these settings.")
    host: str = Field(
        default="127.0.0.1",
        description="The address HTTP and gRPC listen on; 0.0.0.0 for every interface (in a "
        "container, say).",
    )
    port: int = Field(
        default=8000,
        ge=0,
        le=65535,
        description="The HTTP port; 0 picks a free one (the log says which).",
    )
    grpc: bool = Field(
        default=True,
        description="Serve the Open Inference Protocol over gRPC too, on grpc_port (the host "
        "is HTTP's).",
    )
    grpc_port: int = Field(
        default=8001, ge=0, le=65535, description="The gRPC port (Triton's default); 0 picks one."
    )
    grpc_threads: int = Field(
        default=256,
        ge=1,
        description="gRPC calls in progress at once: each waits for its answer in a thread of "
        "its own (the work runs on the event loop). Calls past it wait for a thread, their "
        "deadlines running; a health Watch holds one for as long as it is open.",
    )
    device: str = Field(
        default="auto",
        description="auto (the GPU with most free memory, else CPU), all (every visible GPU), "
        "cpu, cuda or cuda:N.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="The least severe log lines written."
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="text: readable lines; json: one JSON object per line."
    )
    traces: bool = Field(
        default=False,
        description="Export OpenTelemetry traces over OTLP/HTTP: a span per call (the child of "
        "a W3C traceparent the client sent) with its queue and batch, and a span per batch, "
        "linked from its calls. The standard OTEL_* variables configure the exporter "
        "(OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER, ...). Needs "
        "the traces extra: pip install 'gpuserve[traces]'.",
    )
    access_log: bool = Field(
        default=True,
        description="One log line per request: id, route, status, duration, model, batch size, "
        "queue and forward milliseconds.",
    )
    gpu_metrics_interval_s: float = Field(
        default=5.0,
        ge=0,
        description="How often NVML gauges (utilisation, memory, temperature, power) are read "
        "for /metrics; 0 turns them off. Absent where NVML is not available.",
    )
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Larger request bodies get 413 unread."
    )
    parse_offload_bytes: int = Field(
        default=256 * 1024,
        ge=0,
        description="Request bodies this large or larger are parsed in a separate process, so "
        "a large body (parsed holding the GIL) never stalls the other clients.",
    )
    parse_processes: int = Field(
        default=1,
        ge=0,
        le=64,
        description="Processes that parse large bodies, started on the first one; 0 parses "
        "every body on the event loop.",
    )
    keep_alive_s: float = Field(
        default=75.0,
        gt=0,
        description="How long an idle client connection stays open. Longer than the usual 60 s "
        "of load balancers, so the server never closes one a client is about to reuse.",
    )
    shutdown_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="On SIGTERM or SIGINT, how long accepted requests may take to finish; "
        "what is left then is answered 503, and the process exits soon after.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="A connection must send a request's headers within this long of opening "
        "(or of the request's first byte on a kept-alive connection), or it is closed.",
    )
    max_header_bytes: int = Field(
        default=65536,
        ge=1024,
        description="A request's line and headers together, in bytes; past this it gets 431 "
        "and the connection closes, before anything of it is parsed.",
    )
    max_headers: int = Field(
        default=100, ge=8, description="Header fields a request may carry; past this, 431."
    )
    max_url_bytes: int = Field(
        default=8192,
        ge=256,
        description="The request line (method, path and query), in bytes; past this, 414.",
    )
    body_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="A request's body must arrive within this long of its headers (or of "
        "its X-Request-Timeout-Ms, when shorter), or it gets 408 and the connection closes.",
    )
    max_connections: int = Field(
        default=2048,
        ge=1,
        description="Open client connections past this get a 503 and are closed at once; "
        "gRPC's connections are capped at the same number, counted apart. Lowered to what "
        "the open-file limit allows for both (raised to its hard limit at start).",
    )
    # NoDecode: the environment gives a comma-separated list, not JSON.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="When set, every route but the health checks needs "
        "'Authorization: Bearer <key>'. GPUSERVE_API_KEYS takes a comma-separated list.",
    )
    model: ModelSettings | None = Field(
        default=None,
        description="The model to serve, when `models` does not list several.",
    )
    models: list[ModelSettings] | None = Field(
        default=None,
        description="Several models, each with its own batcher and readiness ([[models]] in "
        "TOML). When given, `model` is ignored.",
    )
    keep_running_without_models: bool = Field(
        default=False,
        description="By default the server exits with status 1 once every model has failed "
        "to load; true keeps it up, not ready, with the reasons on /health/ready.",
    )
    repository_api: bool = Field(
        default=False,
        description="The Open Inference Protocol's repository API (/v2/repository/...): list "
        "the configured models, load (or reload) and unload them while serving. Off by "
        "default, as Triton's model control is; it needs an API key when api_keys is set.",
    )
    repository_dir: Path | None = Field(
        default=None,
        description="With repository_api, a folder whose <name>.pt2 files (spec beside them, "
        "or inferred) may be loaded by name without being configured. Names only: no path "
        "from a request is ever opened.",
    )
    default_model: str | None = Field(
        default=None, description="The model /predict serves. Default: the first one."
    )
    workers: int | Literal["auto"] = Field(
        default=1,
        description="Server processes behind the one port, each with its own copy of every "
        "model and its own batches: more cores for HTTP, parsing and encoding. `auto`: one "
        "per core available (capped by a cgroup CPU quota). Each model's max_queue_size "
        "and max_connections are split between them.",
    )
    engine: bool = Field(
        default=False,
        description="With workers above 1: one engine process holds every model (loaded once) "
        "and forms every batch, and the workers only receive, decode and answer requests, so "
        "all of them meet in the same batches. Off: each worker has its own copy and batches.",
    )
    default_versions: dict[str, int] = Field(
        default_factory=dict,
        description="Model name -> the version its routes without a version serve, while that "
        "version is loaded. Default: the highest version ready.",
    )
    ray: RaySettings = Field(
        default_factory=RaySettings, description="Used only when deployed on Ray Serve."
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        return _check_device(value)

    @field_validator("workers", mode="before")
    @classmethod
    def _parse_workers(cls, value: object) -> object:
        # A flag or an environment variable gives text: read it here, so that a wrong value
        # gets one plain message rather than one per member of the union.
        if isinstance(value, str):
            text = value.strip().lower()
            if text == "auto":
                return "auto"
            if not text.isdigit():
                raise ValueError(f"workers must be a number from 1 to 256, or auto, not {value!r}")
            return int(text)
        return value

    @field_validator("workers")
    @classmethod
    def _check_workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError("workers must be between 1 and 256, or auto")
        return value

    @property
    def worker_count(self) -> int:
        """How many server processes: `workers`, with auto read as the cores available."""
        if self.workers == "auto":
            return available_cores()
        return self.workers

    @model_validator(mode="after")
    def _check_models(self) -> Settings:
        served = [(model.key, model.version) for model in self.served_models]
        if len(set(served)) != len(served):
            twice = sorted({f"{k} version {v}" for k, v in served if served.count((k, v)) > 1})
            raise ValueError(f"each model name and version must be unique: {', '.join(twice)}")
        keys = list(dict.fromkeys(key for key, _ in served))
        if self.default_model is not None and self.default_model not in keys:
            raise ValueError(f"default_model {self.default_model!r} is not one of {keys}")
        if self.repository_api and self.worker_count > 1:
            raise ValueError(
                "repository_api needs workers = 1: a load or unload would reach one worker "
                "process only, and the workers would serve different models"
            )
        for name, version in self.default_versions.items():
            if (name, version) not in served:
                raise ValueError(f"default_versions: no model {name!r} version {version}")
        return self

    @field_validator("models")
    @classmethod
    def _check_models_listed(cls, value: list[ModelSettings] | None) -> list[ModelSettings] | None:
        if value is not None and not value:
            raise ValueError(
                "an empty list serves nothing: list at least one model ([[models]] tables in "
                "TOML), or leave `models` out and give one [model]"
            )
        return value

    @property
    def served_models(self) -> list[ModelSettings]:
        """The models this server serves, the default one first; empty when none is named
        (`gpuserve serve` refuses to start then)."""
        models = self.models or ([self.model] if self.model is not None else [])
        first = self.default_model
        return sorted(models, key=lambda model: model.key != first) if first else list(models)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        short = [str(i + 1) for i, key in enumerate(keys) if len(key.get_secret_value()) < 16]
        if short:
            raise ValueError(
                f"API keys must be at least 16 characters long; key {', '.join(short)} is not"
            )
        return keys

    def api_key_values(self) -> list[str]:
        """The API keys themselves, for the one place that compares them."""
        return [key.get_secret_value() for key in self.api_keys]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest priority first: flags (init kwargs), then the environment, then the file.
        return (init_settings, env_settings, _TomlFileSource(settings_cls))


def available_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may use: those it may run on, capped by a cgroup CPU quota (a
    container's CPU limit, which the affinity mask does not show)."""
    cores = len(os.sched_getaffinity(0))
    quota = None
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        limit, period = (cgroup / "cpu.max").read_text().split()
        if limit != "max":
            quota = int(limit) / int(period)
    except (OSError, ValueError):
        try:  # cgroup v1: -1 for none
            limit_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
            if limit_us > 0 and period_us > 0:
                quota = limit_us / period_us
        except (OSError, ValueError):
            pass
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return cores


def _check_device(value: str) -> str:
    value = value.strip().lower()
    if not _DEVICE_PATTERN.match(value):
        raise ValueError(f"device must be auto, all, cpu, cuda or cuda:N, not {value!r}")
    return value


# The settings that name files: in a config file, relative to the file's folder.
_PATH_KEYS = ("path", "weights", "code_dir", "spec", "compile_cache_dir")
_SERVER_PATH_KEYS = ("repository_dir",)


class _TomlFileSource(PydanticBaseSettingsSource):
    """Reads the TOML file whose path the higher-priority sources (flags or env) named."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ is overridden; pydantic-settings never calls this.

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("config_file")
        if path is None:
            return {}
        data = read_config_file(Path(path))
        data.pop("config_file", None)
        folder = Path(path).parent
        _relative_to(folder, data, _SERVER_PATH_KEYS)
        models = [data.get("model"), *(data.get("models") or [])]
        for model in models:
            if isinstance(model, dict):
                _relative_to(folder, model, _PATH_KEYS)
        return data


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML file's keys; ValueError saying what is wrong when it cannot be read."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from None


def _relative_to(folder: Path, table: dict[str, Any], keys: tuple[str, ...]) -> None:
    """A config file's relative paths under `keys`, made relative to its folder: the file
    and its models move together, wherever the server is started from."""
    for key in keys:
        value = table.get(key)
        if isinstance(value, str) and not Path(value).is_absolute():
            table[key] = os.path.normpath(folder / value)


def describe_error(
    exc: ValidationError, flags: Mapping[str, Any], environ: Mapping[str, str]
) -> str:
    """One line per problem: where the value came from (flag, environment variable, or the
    config file's key), the setting and what is wrong. Never the value given (it may be a
    secret), and without pydantic's links."""
    config_file = flags.get("config_file") or environ.get("GPUSERVE_CONFIG_FILE")
    try:
        file_data = read_config_file(Path(config_file)) if config_file else {}
    except ValueError:
        file_data = {}
    # A value that fits no member of a union fails once per member, each under a tag of
    # pydantic's ("int", "literal['auto']"): one line per setting, its messages joined.
    problems: dict[tuple[Any, ...], list[str]] = {}
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = tuple(part for part in error["loc"] if not _union_tag(part))
        message = error["msg"].removeprefix("Value error, ")
        if message not in problems.setdefault(loc, []):
            problems[loc].append(message)
    lines = []
    for loc, messages in problems.items():
        message = "; or ".join(messages)
        if loc:
            source = _source_of(loc, flags, environ, file_data, config_file)
            lines.append(f"  {_dotted(loc)} ({source}): {message}")
            continue
        # A rule across settings: where each setting it names came from.
        named = [name for name in Settings.model_fields if re.search(rf"\b{name}\b", message)]
        given = {
            name: _source_of((name,), flags, environ, file_data, config_file) for name in named
        }
        sources = [f"{name}: {source}" for name, source in given.items() if source != "default"]
        lines.append(f"  settings ({'; '.join(sources) or 'together'}): {message}")
    return "\n".join(lines)


def _union_tag(part: object) -> bool:
    """Whether a part of an error's location names a union's member, not a setting."""
    return isinstance(part, str) and (
        not part.isidentifier() or part in {"int", "float", "str", "bool", "bytes", "none"}
    )


def _dotted(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _source_of(
    loc: tuple[Any, ...],
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    file_data: dict[str, Any],
    config_file: str | Path | None,
) -> str:
    """Where the setting at `loc` came from, in the order the sources take priority."""
    if loc and loc[0] in flags:
        given = flags[loc[0]]
        # --model sets model.path only: the model's other settings come from elsewhere.
        if not isinstance(given, dict) or len(loc) == 1 or loc[1] in given:
            flag = "--model" if loc[0] == "model" else f"--{str(loc[0]).replace('_', '-')}"
            return f"flag {flag}"
    for end in range(len(loc), 0, -1):  # GPUSERVE_MODEL__PORT before GPUSERVE_MODEL
        name = "GPUSERVE_" + "__".join(str(part) for part in loc[:end]).upper()
        if name in environ:
            return f"environment variable {name}"
    node: Any = file_data
    found = []
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            break
        found.append(part)
    if found:
        return f"config file {config_file}, key {_dotted(tuple(found))}"
    return "default"
