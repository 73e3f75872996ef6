"""Settings: one class, read from a TOML file, then `GPUSERVE_*` environment variables, then flags.

Nothing is read at import time. `Settings()` reads the environment when it is built, and the
file named by `config_file` (given as a flag, or as `GPUSERVE_CONFIG_FILE`) at the same moment.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


class ModelSettings(BaseModel):
    """Which model to serve and how to batch its requests."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path = Field(
        default=Path("models/digits.pt2"),
        description="The model file: .pt2 (torch.export) or TorchScript. Relative to the "
        "working directory.",
    )
    spec: Path | None = Field(
        default=None,
        description="The JSON spec (name, input shape, dtype, labels). Default: the model path "
        "with a .json suffix.",
    )
    name: str | None = Field(default=None, description="Overrides the name in the spec.")
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_wait_ms: float = Field(
        default=2.0,
        ge=0.0,
        le=10_000.0,
        description="How long a batch may keep growing while the model is busy. A request that "
        "arrives while the model is idle is dispatched at once, never on this timer.",
    )
    max_instances_per_request: int = Field(default=1024, ge=1)
    max_queue_size: int = Field(
        default=2048,
        ge=1,
        description="Instances that may wait for a batch; past it requests get 503 at once.",
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
        "one within 5% of the best throughput, when that is below max_batch_size.",
    )
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        default="fp32", description="Compute precision of the forward pass (torch.autocast)."
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

    @property
    def warmup_batch_sizes(self) -> tuple[int, ...]:
        """Powers of two up to max_batch_size, and max_batch_size itself."""
        sizes = {
            1 << i for i in range(self.max_batch_size.bit_length()) if 1 << i <= self.max_batch_size
        }
        return tuple(sorted(sizes | {self.max_batch_size}))

    @property
    def spec_path(self) -> Path:
        return self.spec if self.spec is not None else self.path.with_suffix(".json")


class Settings(BaseSettings):
    """Every setting of a gpuserve process. Build it once (see `cli`) and pass it down."""

    model_config = SettingsConfigDict(
        env_prefix="GPUSERVE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    config_file: Path | None = Field(default=None, description="TOML file with these settings.")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Larger request bodies get 413 unread."
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
        description="On SIGTERM, how long accepted requests may take to finish before exit.",
    )
    # NoDecode: the environment gives a comma-separated list, not JSON.
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="When set, every route but the health checks needs "
        "'Authorization: Bearer <key>'. GPUSERVE_API_KEYS takes a comma-separated list.",
    )
    model: ModelSettings = ModelSettings()

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_PATTERN.match(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {value!r}")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, keys: list[str]) -> list[str]:
        if any(len(key) < 16 for key in keys):
            raise ValueError("API keys must be at least 16 characters long")
        return keys

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


class _TomlFileSource(PydanticBaseSettingsSource):
    """Reads the TOML file whose path the higher-priority sources (flags or env) named."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ is overridden; pydantic-settings never calls this.

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("config_file")
        if path is None:
            return {}
        try:
            with Path(path).open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ValueError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
        data.pop("config_file", None)
        return data
