"""The model's declared input and output, and the check every instance passes before it is queued.

Validation happens here, per instance and before batching, so a bad instance is answered with a
422 and never reaches the model, nor the other requests its batch would have held.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gpuserve.core.errors import InvalidInput, ModelLoadError, describe_validation

DType = Literal[
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "uint8", "bool", "string"
]
# One instance: the input's array, or, for a model of several inputs, an array per input name.
Instance = np.ndarray[Any, Any] | dict[str, np.ndarray[Any, Any]]
# What a classifier's output holds, which decides what /predict does with it (see ModelSpec).
OutputKind = Literal["logits", "probabilities", "scores"]

# JSON numbers arrive as int64 or float64 arrays; these are the numpy kinds each dtype accepts.
_ACCEPTED_KINDS: dict[str, str] = {
    "float32": "iuf",
    "float64": "iuf",
    "float16": "iuf",
    "bfloat16": "iuf",
    "int64": "iu",
    "int32": "iu",
    "uint8": "iu",
    "bool": "b",
}
# The values each dtype holds, for the JSON Schema (float bounds rounded inwards).
_DTYPE_RANGE: dict[str, tuple[float, float]] = {
    "float32": (-3.4e38, 3.4e38),
    "float64": (-1.7e308, 1.7e308),
    "float16": (-65504.0, 65504.0),
    "bfloat16": (-3.38e38, 3.38e38),
    "int64": (-(2**63), 2**63 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint8": (0, 255),
}
# numpy has no bfloat16: such inputs travel as float32 and the handler casts on the device.
# Strings are numpy object arrays of Python str (UTF-8 text; the protocols' BYTES).
_NUMPY_DTYPE: dict[str, str] = {"bfloat16": "float32", "string": "object"}


@dataclass(frozen=True, slots=True)
class PlainCheck:
    """What a float tensor's common input must meet to be accepted in two reductions: its
    shape, and the bounds (the spec's and its type's range) that hold every value."""

    shape: tuple[int, ...]
    low: float
    high: float
    target: np.dtype[Any]


class TensorSpec(BaseModel):
    """One tensor of one instance (no batch dimension). -1 marks a dimension of any size."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "input"
    shape: tuple[int, ...]
    dtype: DType = "float32"
    min: float | None = Field(default=None, description="Smallest allowed value, if any.")
    max: float | None = Field(default=None, description="Largest allowed value, if any.")
    max_shape: tuple[int, ...] | None = Field(
        default=None,
        description="Upper bounds of the variable (-1) dimensions, in the same layout as shape "
        "(fixed dimensions repeat their size), e.g. a token sequence of at most 128: [128].",
    )
    pad_value: float = Field(
        default=0, description="What shorter instances are padded with in a batch."
    )
    mask: bool = Field(
        default=True,
        description="The one input of variable length only: true calls the model as "
        "model(values, mask), the mask True at real positions; false calls model(values) "
        "alone, for a model that takes no mask (its padded positions are then its to ignore).",
    )
    kind: OutputKind | None = Field(
        default=None,
        description="Outputs only: what the model returns. logits (the default): /predict "
        "answers softmax probabilities when there are labels; probabilities: served as they "
        "are; scores: served as they are, under `scores`. /v2 always returns the tensor as "
        "the model made it.",
    )

    @model_validator(mode="after")
    def _check(self) -> TensorSpec:
        if any(dim == 0 or dim < -1 for dim in self.shape):
            raise ValueError(f"shape {list(self.shape)} has a dimension that is 0 or below -1")
        if self.max_shape is not None and (
            len(self.max_shape) != len(self.shape)
            or any(
                b < 1 or d not in (-1, b) for d, b in zip(self.shape, self.max_shape, strict=True)
            )
        ):
            raise ValueError(
                f"max_shape {list(self.max_shape)} must match shape {list(self.shape)}, "
                "with a positive bound in place of each -1"
            )
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is larger than max")
        return self

    @cached_property
    def numpy_dtype(self) -> np.dtype[Any]:
        return np.dtype(_NUMPY_DTYPE.get(self.dtype, self.dtype))

    @cached_property
    def plain_check(self) -> PlainCheck | None:
        """The quick check of a float tensor of fixed shape (`_checked`); None for others."""
        target = self.numpy_dtype
        if target.kind != "f" or any(d < 1 for d in self.shape):
            return None
        top = float(np.finfo(target).max)
        low = -top if self.min is None else max(-top, self.min)
        high = top if self.max is None else min(top, self.max)
        return PlainCheck(self.shape, low, high, target)

    @property
    def variable(self) -> bool:
        """Whether some dimension varies from instance to instance."""
        return -1 in self.shape

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether an instance of `shape` matches this spec, bounds included."""
        if len(shape) != len(self.shape):
            return False
        bounds = self.max_shape or self.shape
        return all(
            g == w or (w == -1 and (b == -1 or g <= b))
            for g, w, b in zip(shape, self.shape, bounds, strict=True)
        )

    def describe(self) -> str:
        if not self.shape:  # one value per instance
            return self.dtype
        dims = ", ".join("N" if d == -1 else str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"

    def json_schema(self) -> dict[str, Any]:
        """JSON Schema of one instance: nested arrays of this shape, values within range."""
        node: dict[str, Any]
        if self.dtype == "bool":
            node = {"type": "boolean"}
        elif self.dtype == "string":
            node = {"type": "string"}
        else:
            low, high = _DTYPE_RANGE[self.dtype]
            if self.min is not None:
                low = max(low, self.min)
            if self.max is not None:
                high = min(high, self.max)
            kind = "number" if self.numpy_dtype.kind == "f" else "integer"
            node = {"type": kind, "minimum": low, "maximum": high}
        bounds = self.max_shape or self.shape
        for dim, bound in zip(reversed(self.shape), reversed(bounds), strict=True):
            size: dict[str, int] = {"minItems": 1 if dim == -1 else dim}
            if bound != -1:
                size["maxItems"] = bound
            node = {"type": "array", "items": node, **size}
        return node

    def sample(self, rng: np.random.Generator) -> np.ndarray[Any, Any]:
        """A random valid instance (variable dimensions set to 8), for precision checks."""
        bounds = self.max_shape or self.shape
        shape = tuple(
            d if d != -1 else 8 if b == -1 else min(8, b)
            for d, b in zip(self.shape, bounds, strict=True)
        )
        if self.dtype == "bool":
            return rng.random(shape) < 0.5
        if self.dtype == "string":
            words = np.array(["alpha", "beta", "gamma", "delta"], dtype=object)
            return rng.choice(words, shape)
        low, high = _DTYPE_RANGE[self.dtype]
        low = max(low, self.min if self.min is not None else -1.0)
        high = min(high, self.max if self.max is not None else 1.0)
        if self.numpy_dtype.kind == "f":
            return rng.uniform(low, high, shape).astype(self.numpy_dtype)
        return rng.integers(int(low), int(high), shape, endpoint=True).astype(self.numpy_dtype)

    def example(self, length: int = 1) -> np.ndarray[Any, Any]:
        """A valid instance (variable dimensions `length`, within bounds), for warm-up batches."""
        bounds = self.max_shape or self.shape
        shape = tuple(
            d if d != -1 else length if b == -1 else min(length, b)
            for d, b in zip(self.shape, bounds, strict=True)
        )
        if self.dtype == "string":
            return np.full(shape, " ".join(["example"] * length), dtype=object)
        fill = 0.0 if self.min is None else self.min
        return np.full(shape, fill, dtype=self.numpy_dtype)


class ModelSpec(BaseModel):
    """What a model takes and returns. Stored as JSON beside the model file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    input: TensorSpec | None = Field(default=None, description="The model's one input.")
    output: TensorSpec | None = Field(default=None, description="The model's one output.")
    inputs: list[TensorSpec] | None = Field(
        default=None,
        description="Several named inputs instead, in the order the model takes them; each "
        "instance is then an object of them.",
    )
    outputs: list[TensorSpec] | None = Field(
        default=None,
        description="Several named outputs instead, in the order the model returns them (a "
        "tuple), or by name (a dict).",
    )
    labels: list[str] | None = Field(
        default=None,
        description="Class names; when set, /predict answers a label with the probabilities "
        "(or scores, see output.kind). Only with one output.",
    )
    description: str = ""

    @model_validator(mode="before")
    @classmethod
    def _one_of_each(cls, data: Any) -> Any:
        """`inputs` of one tensor is `input`, and likewise for outputs: one way to say each.
        An output given no name is called `output` (a tensor's name defaults to `input`)."""
        if isinstance(data, dict):
            data = dict(data)
            for one, several in (("input", "inputs"), ("output", "outputs")):
                listed = data.get(several)
                if data.get(one) is None and isinstance(listed, list) and len(listed) == 1:
                    data[one] = listed[0]
                    del data[several]
            output = data.get("output")
            if isinstance(output, dict) and "name" not in output:
                data["output"] = {**output, "name": "output"}
            elif isinstance(output, TensorSpec) and "name" not in output.model_fields_set:
                data["output"] = output.model_copy(update={"name": "output"})
        return data

    @property
    def input_specs(self) -> list[TensorSpec]:
        """Every input, in the order the model takes them."""
        return [self.input] if self.input is not None else list(self.inputs or ())

    @property
    def output_specs(self) -> list[TensorSpec]:
        """Every output, in the order the model returns them."""
        return [self.output] if self.output is not None else list(self.outputs or ())

    @property
    def output_kind(self) -> OutputKind:
        """What the output holds: `output.kind`, logits when not given."""
        return (self.output.kind if self.output is not None else None) or "logits"

    @model_validator(mode="after")
    def _check_labels(self) -> ModelSpec:
        for one, several in (("input", "inputs"), ("output", "outputs")):
            given = [key for key in (one, several) if getattr(self, key) is not None]
            if len(given) != 1:
                raise ValueError(f"give exactly one of '{one}' (a tensor) or '{several}' (a list)")
            tensors = getattr(self, several)
            if tensors is not None:
                names = [tensor.name for tensor in tensors]
                if not names or len(set(names)) != len(names):
                    raise ValueError(f"'{several}' must list tensors of distinct names")
        if any(tensor.kind is not None for tensor in self.input_specs):
            raise ValueError("kind describes an output; an input has none")
        if self.labels is not None:
            if self.output is None:
                raise ValueError("labels need a model of one output")
            if self.output.shape[-1:] != (len(self.labels),):
                shape = list(self.output.shape)
                raise ValueError(f"{len(self.labels)} labels do not match output shape {shape}")
        return self

    def describe_inputs(self) -> str:
        """The input, or each named input, as `dtype[dims]`."""
        if self.input is not None:
            return self.input.describe()
        return "{" + ", ".join(f"{t.name}: {t.describe()}" for t in self.input_specs) + "}"

    def describe_outputs(self) -> str:
        if self.output is not None:
            return self.output.describe()
        return "{" + ", ".join(f"{t.name}: {t.describe()}" for t in self.output_specs) + "}"

    def example(self, length: int = 1) -> Instance:
        """A valid instance, for warm-up batches (see TensorSpec.example)."""
        if self.input is not None:
            return self.input.example(length)
        return {t.name: t.example(length) for t in self.input_specs}

    def sample(self, rng: np.random.Generator) -> Instance:
        """A random valid instance, for precision checks (see TensorSpec.sample)."""
        if self.input is not None:
            return self.input.sample(rng)
        return {t.name: t.sample(rng) for t in self.input_specs}

    def instance_schema(self) -> dict[str, Any]:
        """JSON Schema of one /predict instance: the input's, or an object of the inputs."""
        if self.input is not None:
            return self.input.json_schema()
        names = [t.name for t in self.input_specs]
        return {
            "type": "object",
            "properties": {t.name: t.json_schema() for t in self.input_specs},
            "required": names,
            "additionalProperties": False,
        }

    @classmethod
    def from_file(cls, path: Path) -> ModelSpec:
        """Read and check a spec file; every failure is a ModelLoadError naming the file.

        `name` may be left out: the model is served under its configured name anyway.
        """
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise ModelLoadError(
                f"model spec not found: {path} (looked for {path.resolve()})"
            ) from None
        except ValueError as exc:
            raise ModelLoadError(f"model spec {path} is not valid JSON: {exc}") from None
        if isinstance(data, dict):
            data.setdefault("name", path.stem)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = describe_validation(exc, "spec")
            raise ModelLoadError(f"model spec {path} is invalid: {problems}") from None

    @classmethod
    def resolve(cls, source: Path | dict[str, Any], name: str) -> ModelSpec:
        """The spec from a file or from inline keys, served under `name`."""
        if isinstance(source, Path):
            return cls.from_file(source).model_copy(update={"name": name})
        try:
            return cls.model_validate({**source, "name": name})
        except ValidationError as exc:
            raise ModelLoadError(f"the inline spec of {name} is invalid: {exc}") from None

    def to_file(self, path: Path) -> None:
        path.write_text(
            json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2) + "\n"
        )


def to_array(value: Any, spec: TensorSpec, field: str) -> np.ndarray[Any, Any]:
    """Turn one JSON instance into an array of the spec's shape and dtype, or raise InvalidInput.

    `field` names the place in the request (`inputs`, `instances[3]`) for the error message.
    """
    text = spec.dtype == "string" and isinstance(value, str)
    if (isinstance(value, (str, bytes, dict)) and not text) or value is None:
        raise InvalidInput(f"{field}: expected {spec.describe()}, got {_json_type(value)}")
    try:
        # No dtype here: numpy would turn "1" into 1.0 and True into 1.0 if it were given one.
        array = np.asarray(value)
    except (ValueError, OverflowError) as exc:
        raise InvalidInput(
            f"{field}: expected {spec.describe()}, got a ragged or non-numeric array ({exc})"
        ) from None
    return _checked(array, spec, field, batched=False)


def to_instance(value: Any, spec: ModelSpec, field: str) -> Instance:
    """One JSON instance for the model: an array for its one input, or an object holding
    each of its inputs by name (every one, and no other)."""
    if spec.input is not None:
        return to_array(value, spec.input, field)
    names = [t.name for t in spec.input_specs]
    if not isinstance(value, dict):
        raise InvalidInput(f"{field}: expected an object of the inputs {names}")
    missing = [name for name in names if name not in value]
    unknown = sorted(set(value) - set(names))
    if missing or unknown:
        what = f"missing {missing}" if missing else f"unknown {unknown}"
        raise InvalidInput(f"{field}: {what}; the model takes the inputs {names}")
    return {t.name: to_array(value[t.name], t, f"{field}.{t.name}") for t in spec.input_specs}


def to_instances(values: list[Any], spec: ModelSpec, field: str) -> list[Instance]:
    """A list of JSON instances for the model (see `to_instance`)."""
    if spec.input is not None:
        return list(to_arrays(values, spec.input, field))
    return [to_instance(value, spec, f"{field}[{i}]") for i, value in enumerate(values)]


def to_arrays(values: list[Any], spec: TensorSpec, field: str) -> list[np.ndarray[Any, Any]]:
    """Turn a list of JSON instances into arrays, checking them as one block when they stack.

    One numpy pass over the block costs a fraction of one per instance. When the block does
    not stack or fails a check, each instance is checked alone, so the error names the one
    at fault (`instances[3]: ...`).
    """
    try:
        block = np.asarray(values)
    except (ValueError, OverflowError):
        block = None
    if block is not None and block.dtype.kind in "iuf":
        with contextlib.suppress(InvalidInput):
            return list(_checked(block, spec, field, batched=True))
    return [to_array(value, spec, f"{field}[{i}]") for i, value in enumerate(values)]


def block_to_arrays(
    block: np.ndarray[Any, Any], spec: TensorSpec, field: str
) -> list[np.ndarray[Any, Any]]:
    """Check a tensor of N instances (first dimension N) at once and cut it into instances."""
    if block.ndim == 0:
        raise InvalidInput(f"{field}: expected a batch of {spec.describe()}, got a scalar")
    return list(_checked(block, spec, field, batched=True))


def _checked(
    array: np.ndarray[Any, Any], spec: TensorSpec, field: str, batched: bool
) -> np.ndarray[Any, Any]:
    """Check kind, shape, finiteness and range, then cast to the spec's dtype."""
    plain = spec.plain_check
    if (
        plain is not None
        and array.dtype.kind in "fiu"
        and (array.shape[1:] if batched else array.shape) == plain.shape
        and array.size
        # Every value finite and within bounds, in two reductions (NaN fails a comparison):
        # what nearly every request holds. Anything else takes the checks below, which also
        # say what is wrong.
        and plain.low <= array.min()
        and array.max() <= plain.high
    ):
        return array.astype(plain.target)
    return _checked_fully(array, spec, field, batched)


def _checked_fully(
    array: np.ndarray[Any, Any], spec: TensorSpec, field: str, batched: bool
) -> np.ndarray[Any, Any]:
    """`_checked` without its quick path: each check on its own, naming what fails."""
    if spec.dtype == "string":
        return _checked_strings(array, spec, field, batched)
    if array.dtype.kind == "f" and spec.numpy_dtype.kind in "iu" and _integral(array):
        array = array.astype(np.int64)  # JSON does not tell 1.0 from 1
    _check_kind_and_shape(array, spec, field, batched, _ACCEPTED_KINDS[spec.dtype])
    # One reduction finds NaN (a NaN largest magnitude), infinity and values too large for
    # the spec's float type, where separate checks cost a numpy call each.
    largest = np.abs(array).max() if array.dtype.kind == "f" else None
    if largest is not None and not np.isfinite(largest):
        raise InvalidInput(f"{field}: expected {spec.describe()}, got NaN or infinity")
    if spec.min is not None and array.min() < spec.min:
        raise InvalidInput(f"{field}: values must be >= {spec.min}, got {array.min()}")
    if spec.max is not None and array.max() > spec.max:
        raise InvalidInput(f"{field}: values must be <= {spec.max}, got {array.max()}")
    target = spec.numpy_dtype
    if largest is not None and target.kind == "f":
        if largest <= np.finfo(target).max:
            return array.astype(target)  # nothing can overflow
        with np.errstate(over="ignore"):  # near the top: whether it rounds to infinity
            converted = array.astype(target)
        if not np.isfinite(converted).all():
            raise InvalidInput(f"{field}: values overflow {spec.dtype}")
        return converted
    if array.dtype.kind in "iu" and target.kind in "iu":
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(f"{field}: values do not fit in {spec.dtype}")
    return array.astype(target, copy=False)


def _check_kind_and_shape(
    array: np.ndarray[Any, Any], spec: TensorSpec, field: str, batched: bool, kinds: str
) -> None:
    """InvalidInput unless the array's numpy kind is one of `kinds` and its instances have
    the spec's shape (within bounds), and are not empty."""
    if array.dtype.kind not in kinds:
        raise InvalidInput(f"{field}: expected {spec.describe()}, got {_kind_name(array)}")
    shape = array.shape[1:] if batched else array.shape
    if not spec.fits(shape):
        bound = f" (at most {list(spec.max_shape)})" if spec.max_shape else ""
        raise InvalidInput(f"{field}: expected {spec.describe()}{bound}, got shape {list(shape)}")
    if array.size == 0:
        raise InvalidInput(f"{field}: expected {spec.describe()}, got an empty array")


def _checked_strings(
    array: np.ndarray[Any, Any], spec: TensorSpec, field: str, batched: bool
) -> np.ndarray[Any, Any]:
    """Strings: text, or bytes that are UTF-8 (BYTES tensors), as an object array of str."""
    _check_kind_and_shape(array, spec, field, batched, "OUS")
    if array.dtype.kind == "U":
        return array.astype(object)
    texts = np.empty(array.shape, dtype=object)
    for index, value in np.ndenumerate(array):
        if isinstance(value, bytes):
            try:
                value = value.decode()
            except UnicodeDecodeError:
                raise InvalidInput(f"{field}: strings must be UTF-8 text") from None
        elif not isinstance(value, str):
            raise InvalidInput(
                f"{field}: expected {spec.describe()}, got {type(value).__name__} values"
            )
        texts[index] = value
    return texts


def _integral(array: np.ndarray[Any, Any]) -> bool:
    with np.errstate(invalid="ignore"):
        return bool(np.isfinite(array).all() and (array == np.round(array)).all()) and bool(
            array.size == 0 or np.abs(array).max() < 2**63
        )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    return "a string"


def _kind_name(array: np.ndarray[Any, Any]) -> str:
    return {
        "b": "booleans",
        "U": "strings",
        "S": "strings",
        "f": "floats",
        "i": "integers",
        "u": "integers",
        "O": "nulls, mixed types or integers too large for int64",
    }.get(array.dtype.kind, f"values of type {array.dtype}")
