"""The Open Inference Protocol (KServe v2, as spoken by Triton, KServe, MLServer, TorchServe).

Pure encoding and decoding, no HTTP framework: an infer request body (JSON, or JSON followed by
raw tensor bytes under the binary tensor data extension) becomes the model's instances, and
the model's rows become a response body. Every input error is a InvalidInput (400).

A request tensor of shape [N, ...] carries N instances; each joins the batcher on its own,
exactly like the instances of a /predict request. For a model of several inputs, every input
carries the same N, and instance i holds row i of each. gRPC's messages are turned into the
same dicts (`decode_fields`), so both transports share every check here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from gpuserve.core.errors import InferenceError, InvalidInput
from gpuserve.spec import Instance, ModelSpec, TensorSpec, block_to_arrays

HEADER_LENGTH = "inference-header-content-length"

# Protocol datatypes and their little-endian numpy layouts. BF16 travels as 16-bit words.
_DATATYPES: dict[str, str] = {
    "BOOL": "|b1",
    "UINT8": "|u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "|i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
    "BF16": "<u2",
}
_OF_SPEC: dict[str, str] = {
    "float32": "FP32",
    "float64": "FP64",
    "float16": "FP16",
    "bfloat16": "BF16",
    "int64": "INT64",
    "int32": "INT32",
    "uint8": "UINT8",
    "bool": "BOOL",
    "string": "BYTES",
}


def datatype(spec: TensorSpec) -> str:
    """The protocol's name for a spec's dtype."""
    return _OF_SPEC[spec.dtype]


# Triton's platform name for a PyTorch model: in metadata and configuration alike.
PLATFORM = "pytorch_libtorch"


def metadata(spec: ModelSpec, platform: str, versions: list[str]) -> dict[str, Any]:
    """The model metadata response: the versions loaded, tensors with the batch dimension
    as -1."""

    def tensor(t: TensorSpec, dims: list[int]) -> dict[str, Any]:
        return {"name": t.name, "datatype": datatype(t), "shape": [-1, *dims]}

    return {
        "name": spec.name,
        "versions": versions,
        "platform": platform,
        "inputs": [tensor(t, input_dims(t)) for t in spec.input_specs],
        "outputs": [tensor(t, list(t.shape)) for t in spec.output_specs],
    }


def input_dims(spec: TensorSpec) -> list[int]:
    """An input's dimensions past the batch's, as metadata and configuration give them: one
    value per instance (a text, say) is [1], as Triton describes it (with a reshape to [] in
    the configuration); requests may send it as [N, 1] or [N]. Tools that generate inputs
    from these (perf_analyzer) cannot from []."""
    return list(spec.shape) or [1]


# The extensions gpuserve speaks, exactly: server metadata lists these and no others.
EXTENSIONS = (
    "binary_tensor_data",
    "classification",
    "model_configuration",
    "parameters",
    "statistics",
)
# Listed too when the repository API is on.
REPOSITORY_EXTENSION = "model_repository"

# Triton's extensions gpuserve does not serve, by gRPC method and by HTTP route (under /v2):
# each answers NOT_SERVED (gRPC UNIMPLEMENTED, HTTP 501) saying which, never a bare 404.
_SYSTEM_SHM = "the system shared memory extension"
_CUDA_SHM = "the CUDA shared memory extension"
_TRACE = "the trace extension"
_LOGGING = "the logging extension"
_GENERATE = "the generate extension"
NOT_SERVED_CALLS = {
    "CudaSharedMemoryRegister": _CUDA_SHM,
    "CudaSharedMemoryStatus": _CUDA_SHM,
    "CudaSharedMemoryUnregister": _CUDA_SHM,
    "SystemSharedMemoryRegister": _SYSTEM_SHM,
    "SystemSharedMemoryStatus": _SYSTEM_SHM,
    "SystemSharedMemoryUnregister": _SYSTEM_SHM,
    "LogSettings": _LOGGING,
    "TraceSetting": _TRACE,
    "ModelStreamInfer": "streaming inference (decoupled models)",
}
NOT_SERVED_ROUTES = {
    "/systemsharedmemory{rest:path}": _SYSTEM_SHM,
    "/cudasharedmemory{rest:path}": _CUDA_SHM,
    "/logging": _LOGGING,
    "/trace/setting": _TRACE,
    "/models/{name}/trace/setting": _TRACE,
    "/models/{name}/versions/{version}/trace/setting": _TRACE,
    "/models/{name}/generate": _GENERATE,
    "/models/{name}/generate_stream": _GENERATE,
    "/models/{name}/versions/{version}/generate": _GENERATE,
    "/models/{name}/versions/{version}/generate_stream": _GENERATE,
}
# The parameters it acts on, at each level; any other is refused, never silently ignored.
_REQUEST_PARAMETERS = frozenset({"binary_data_output", "priority", "timeout"})
# Request parameters at the value that asks for nothing: what the protocol's own defaults say
# (no priority, no sequence), accepted as the absence they mean. Another value is refused.
_NO_OP_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "sequence_id": (0, ""),
    "sequence_start": (False,),
    "sequence_end": (False,),
}
# Triton reserves this prefix for its own clients' settings (perf_analyzer sends
# triton_enable_empty_final_response): they say nothing to a model, and are let through.
_RESERVED_PREFIX = "triton_"
INPUT_PARAMETERS = frozenset({"binary_data_size"})
# "classification" is the classification extension's own name for the count, the one
# tritonclient sends for its `class_count`; "class_count" is accepted too.
_OUTPUT_PARAMETERS = frozenset({"binary_data", "classification", "class_count"})


@dataclass(frozen=True, slots=True)
class OutputChoice:
    """One output to send back, and how: as binary data or JSON, and with `class_count`
    the classification extension's top classes (strings) instead of the tensor."""

    spec: TensorSpec
    binary: bool
    class_count: int | None = None


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded infer request: the model's instances, and which outputs to send back, how.

    `timeout_s` is the client's own deadline (the `timeout` parameter, in microseconds as in
    Triton), if it gave one; `priority` its `priority` parameter (1 the highest, 0 the
    model's default), if it gave one.
    """

    id: str | None
    instances: list[Instance]
    outputs: list[OutputChoice]
    timeout_s: float | None = None
    priority: int | None = None


def decode_request(
    body: bytes, spec: ModelSpec, limit: int | None = None, header_length: str | None = None
) -> InferRequest:
    """Parse and check an infer request against the model's spec.

    `limit` bounds the instances (the tensor's first dimension); it is checked on the declared
    shape, before any data is converted. `header_length` is the binary extension's
    Inference-Header-Content-Length: the JSON header's size, the tensors' bytes after it.
    """
    header, binary = _split_body(body, header_length)
    request = json_object(header, "the request")

    starts = _binary_starts(request.get("inputs"))
    data = memoryview(binary)

    def read(tensor: dict[str, Any], spec: TensorSpec) -> np.ndarray[Any, Any]:
        return _tensor_data(tensor, data[starts.get(id(tensor), 0) :], spec, limit)

    return decode_fields(request, spec, read)


def json_object(data: bytes | memoryview, what: str) -> dict[str, Any]:
    """`data` parsed as one JSON object; InvalidInput (400) naming `what` if it is not one."""
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return parsed


def _binary_starts(inputs: Any) -> dict[int, int]:
    """Where each input's binary data starts after the JSON header: the inputs' data follow
    one another in the order the request lists them (keyed by the tensor object's id)."""
    starts: dict[int, int] = {}
    position = 0
    for tensor in inputs if isinstance(inputs, list) else ():
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
            starts[id(tensor)] = position
            position += size
    return starts


# How a protocol reads one input tensor's data: from the tensor's fields (its datatype,
# shape and parameters, already a dict), checked against the input's spec.
TensorReader = Callable[[dict[str, Any], TensorSpec], np.ndarray[Any, Any]]


def decode_fields(request: dict[str, Any], spec: ModelSpec, read: TensorReader) -> InferRequest:
    """Check an infer request given as the protocol's fields (JSON's, or gRPC's turned into
    the same dicts), with `read` giving each input tensor's data."""
    parameters = supported(request, _REQUEST_PARAMETERS, "the request")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, not {_json_type(request_id)}")
    return InferRequest(
        id=request_id,
        instances=_request_instances(request.get("inputs"), spec, read),
        outputs=_output_choices(request, parameters, spec),
        timeout_s=_timeout_s(parameters.get("timeout")),
        priority=priority(parameters.get("priority"), "parameter 'priority'"),
    )


def _request_instances(inputs: Any, spec: ModelSpec, read: TensorReader) -> list[Instance]:
    """Every input tensor the model takes, each given once, cut into instances: arrays for a
    model of one input, or an object of arrays per instance for several."""
    wanted = spec.input_specs
    names = [t.name for t in wanted]
    takes = f"the model takes {', '.join(map(repr, names))}"
    if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs):
        raise InvalidInput(f"'inputs' must be a list of tensors: {takes}")
    given: dict[str, dict[str, Any]] = {}
    for tensor in inputs:
        name = tensor.get("name")
        if name not in names:
            raise InvalidInput(f"unknown input {name!r}: {takes}")
        if name in given:
            raise InvalidInput(f"input {name!r} is given twice")
        given[name] = tensor
    missing = [name for name in names if name not in given]
    if missing:
        raise InvalidInput(f"missing input {', '.join(map(repr, missing))}: {takes}")
    columns = {t.name: _instances(t, read(given[t.name], t)) for t in wanted}
    if spec.input is not None:
        return list(columns[spec.input.name])
    counts = {name: len(column) for name, column in columns.items()}
    if len(set(counts.values())) != 1:
        raise InvalidInput(f"the inputs must hold the same number of instances, not {counts}")
    return [
        {name: column[i] for name, column in columns.items()}
        for i in range(next(iter(counts.values())))
    ]


def _is_no_op(name: str, value: Any) -> bool:
    """Whether a parameter is at the value that asks for nothing (`priority: 0`, say)."""
    defaults = _NO_OP_DEFAULTS.get(name)
    return defaults is not None and type(value) in {type(d) for d in defaults} and value in defaults


def priority(value: Any, what: str) -> int | None:
    """A request's `priority` parameter (1 the highest, 0 the default); whether the model
    has that level is the service's to say."""
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= 2**32:
        raise InvalidInput(f"{what} must be a whole number, 1 the highest, not {value!r}")
    return value


def _timeout_s(value: Any) -> float | None:
    """The `timeout` parameter (microseconds, as Triton's clients send it), in seconds; 0, as
    Triton has it, is no timeout of the request's own."""
    if value is None or (value == 0 and type(value) is int):
        return None
    return _positive_int(value, "parameter 'timeout'", " of microseconds") / 1e6


def _positive_int(value: Any, what: str, unit: str = "") -> int:
    """`value` if it is a positive JSON integer (not a boolean), else a 400 naming `what`."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInput(f"{what} must be a positive integer{unit}, not {value!r}")
    return value


# What a refusal repeats of a request: a few of its names, each cut short, so a message
# stays within what any transport carries (gRPC's status message above all).
_NAMES_SHOWN = 5
_NAME_SHOWN = 64
# More dimensions than any model takes (numpy's own limit is 64).
_MAX_DIMS = 32


def supported(owner: dict[str, Any], allowed: frozenset[str], where: str) -> dict[str, Any]:
    """An object's parameters, refused with a 400 naming any that gpuserve does not act on
    (sequence_id, priority, shared memory, ...): silence would mislead."""
    parameters = _parameters(owner, where)
    unknown = sorted(
        name
        for name, value in parameters.items()
        if name not in allowed
        and not name.startswith(_RESERVED_PREFIX)
        and not _is_no_op(name, value)
    )
    if unknown:
        # Bounded, whatever the request sent: the first few names, each cut short.
        shown = [repr(name[:_NAME_SHOWN]) for name in unknown[:_NAMES_SHOWN]]
        if len(unknown) > _NAMES_SHOWN:
            shown.append(f"and {len(unknown) - _NAMES_SHOWN} more")
        names = ", ".join(shown)
        supported = ", ".join(sorted(allowed))
        raise InvalidInput(f"{where}: parameter {names} is not supported (supported: {supported})")
    return parameters


@dataclass(frozen=True, slots=True)
class OutputTensor:
    """A response's output tensor: the model's rows as one array, or the classification
    extension's strings (`datatype` BYTES)."""

    datatype: str
    array: np.ndarray[Any, Any]
    spec: TensorSpec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def shape(self) -> list[int]:
        return list(self.array.shape)

    def raw(self) -> bytes:
        """The tensor's bytes as the binary extension and gRPC's raw contents carry them."""
        if self.datatype == "BYTES":
            return _bytes_elements(self.array)
        return _to_bytes(self.array, self.spec)

    def values(self) -> Any:
        """The flat values for JSON: numbers as a numpy array, strings as a list."""
        if self.datatype == "BYTES":
            return self.array.ravel().tolist()
        return self.array.ravel()


def output_tensors(
    spec: ModelSpec, rows: list[Any], outputs: list[OutputChoice]
) -> list[OutputTensor]:
    """The model's rows for one request as the protocol's output tensors, those asked for.

    Rows are arrays for a model of one output, or objects of arrays by output name."""
    several = spec.output is None
    return [
        _output_tensor(
            choice.spec,
            [row[choice.spec.name] for row in rows] if several else rows,
            choice.class_count,
            spec.labels,
        )
        for choice in outputs
    ]


def _output_tensor(
    want: TensorSpec, rows: list[Any], class_count: int | None, labels: list[str] | None
) -> OutputTensor:
    """One output's rows for one request as the protocol's output tensor.

    With `class_count`, the output is the classification extension's instead: for each
    instance its top classes as BYTES strings "score:index:label", highest first.
    """
    try:
        array = np.asarray(rows, dtype=want.numpy_dtype)  # bfloat16 rows travel as float32
    except ValueError as exc:
        raise InferenceError("the model's outputs for this request do not form one tensor") from exc
    if class_count is not None:
        return OutputTensor("BYTES", _classes(array, class_count, labels), want)
    return OutputTensor(datatype(want), array, want)


def encode_response(
    spec: ModelSpec,
    rows: list[Any],
    request_id: str | None,
    outputs: list[OutputChoice],
    version: str,
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary data follows it."""
    described: list[dict[str, Any]] = []
    raw: list[bytes] = []
    tensors = output_tensors(spec, rows, outputs)
    for choice, tensor in zip(outputs, tensors, strict=True):
        output: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype}
        output["shape"] = tensor.shape
        if choice.binary:
            raw.append(tensor.raw())
            output["parameters"] = {"binary_data_size": len(raw[-1])}
        else:
            output["data"] = tensor.values()
        described.append(output)
    body: dict[str, Any] = {"model_name": spec.name, "model_version": version, "outputs": described}
    if request_id is not None:
        body["id"] = request_id
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not raw:
        return header, None
    return header + b"".join(raw), len(header)


def _classes(array: np.ndarray[Any, Any], count: int, labels: list[str] | None) -> Any:
    """Each instance's `count` highest values as "score:index[:label]", as Triton writes
    them (the score with six decimals), over the output's last dimension."""
    if array.ndim != 2:
        shape = list(array.shape[1:])
        raise InvalidInput(
            f"class_count needs an output of one dimension per instance, not {shape}"
        )
    count = min(count, array.shape[1])
    # A stable sort of the negated scores: ties keep the lower index first.
    top = np.argsort(-array.astype(np.float64), axis=1, kind="stable")[:, :count]
    strings = np.empty(top.shape, dtype=object)
    for row, indices in enumerate(top):
        for column, index in enumerate(indices):
            text = f"{float(array[row, index]):f}:{index}"
            strings[row, column] = f"{text}:{labels[index]}" if labels else text
    return strings


def _bytes_elements(strings: Any) -> bytes:
    """BYTES elements in the binary extension's layout: each a 4-byte little-endian length,
    then its UTF-8 bytes."""
    parts = []
    for text in strings.ravel():
        encoded = str(text).encode()
        parts += [len(encoded).to_bytes(4, "little"), encoded]
    return b"".join(parts)


def _parameters(owner: dict[str, Any], where: str) -> dict[str, Any]:
    """An object's `parameters`: absent, or an object; anything else is a 400."""
    parameters = owner.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"{where}: 'parameters' must be an object, not {_json_type(parameters)}")
    return parameters


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number"}
    return names.get(type(value), "a number" if isinstance(value, float) else "a value")


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    # Plain digits only: int() would also take "+10", "1_0" and " 10".
    length = int(header_length) if header_length.isascii() and header_length.isdigit() else -1
    if not 0 < length <= len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length must be between 1 and the body's {len(body)} "
            f"bytes, not {header_length!r}"
        )
    return body[:length], body[length:]


def _tensor_data(
    tensor: dict[str, Any], binary: bytes | memoryview, spec: TensorSpec, limit: int | None
) -> np.ndarray[Any, Any]:
    name = spec.name
    declared: Any = tensor.get("datatype")
    shape: Any = tensor.get("shape")
    count = _check_header(spec, declared, shape, limit)
    size = supported(tensor, INPUT_PARAMETERS, f"input {name!r}").get("binary_data_size")
    if size is not None:
        return _from_bytes(binary, size, declared, shape, count, name)
    if "data" not in tensor:
        raise InvalidInput(f"input {name!r} has neither 'data' nor binary data")
    return _from_values(tensor["data"], shape, count, name, declared)


def input_array(
    spec: TensorSpec,
    declared: Any,
    shape: Any,
    limit: int | None,
    *,
    raw: bytes | None = None,
    values: Any = None,
) -> np.ndarray[Any, Any]:
    """One input tensor as carried outside JSON (gRPC): its datatype and shape, and either
    its raw little-endian bytes or its values, checked against them."""
    count = _check_header(spec, declared, shape, limit)
    if raw is not None and declared == "BYTES":
        return _strings(raw, shape, count, spec.name, f"{len(raw)} bytes of raw contents")
    if raw is not None:
        needed = count * np.dtype(_DATATYPES[declared]).itemsize
        if len(raw) != needed:
            raise InvalidInput(
                f"input {spec.name!r}: {len(raw)} bytes of raw contents do not fit shape "
                f"{shape} of {declared} ({needed} bytes)"
            )
        return _from_bytes(raw, len(raw), declared, shape, count, spec.name)
    return _from_values(values, shape, count, spec.name, declared)


def _instances(spec: TensorSpec, array: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]:
    if not spec.shape and array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]  # one value per instance, sent as the metadata's [N, 1]
    try:
        return block_to_arrays(array, spec, spec.name)
    except InvalidInput as exc:
        raise InvalidInput(exc.message) from None


def _check_header(spec: TensorSpec, declared: Any, shape: Any, limit: int | None) -> int:
    """The tensor's element count, once its datatype, shape and instance count pass."""
    name = spec.name
    if declared != datatype(spec):
        raise InvalidInput(f"input {name!r}: datatype must be {datatype(spec)}, not {declared!r}")
    if not isinstance(shape, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
    ):
        raise InvalidInput(f"input {name!r}: shape must be a list of sizes, not {shape!r}")
    if len(shape) > _MAX_DIMS:
        raise InvalidInput(
            f"input {name!r}: a shape of {len(shape)} dimensions; at most {_MAX_DIMS} are taken"
        )
    if limit is not None and shape and shape[0] > limit:
        raise InvalidInput(f"{shape[0]} instances given, at most {limit} allowed")
    # Python's integers, not numpy's: a product of large sizes must not wrap around int64.
    return math.prod(shape)


def _from_values(
    values: Any, shape: list[int], count: int, name: str, declared: str
) -> np.ndarray[Any, Any]:
    try:
        # Strings as Python objects: numpy's own string arrays drop trailing NUL characters.
        array = np.array(values, dtype=object) if declared == "BYTES" else np.asarray(values)
    except (ValueError, OverflowError):
        raise InvalidInput(f"input {name!r}: 'data' is ragged or not numeric") from None
    if array.size != count:
        raise InvalidInput(f"input {name!r}: shape {shape} needs {count} values, got {array.size}")
    return array.reshape(shape)


def _from_bytes(
    binary: bytes | memoryview, size: Any, declared: str, shape: list[int], count: int, name: str
) -> np.ndarray[Any, Any]:
    if declared == "BYTES":
        if not isinstance(size, int) or not 0 <= size <= len(binary):
            raise InvalidInput(
                f"input {name!r}: binary_data_size {size!r} does not fit in the "
                f"{len(binary)} bytes sent"
            )
        return _strings(binary[:size], shape, count, name, f"{size} bytes of binary data")
    dtype = np.dtype(_DATATYPES[declared])
    if not isinstance(size, int) or size != count * dtype.itemsize or size > len(binary):
        raise InvalidInput(
            f"input {name!r}: binary_data_size {size!r} does not fit shape {shape} of "
            f"{declared} ({count * dtype.itemsize} bytes) in the {len(binary)} bytes sent"
        )
    array = np.frombuffer(binary, dtype=dtype, count=count).reshape(shape)
    if declared == "BF16":  # bfloat16 is the top half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _strings(
    data: bytes | memoryview, shape: list[int], count: int, name: str, what: str
) -> np.ndarray[Any, Any]:
    """BYTES elements in Triton's layout (each a 4-byte little-endian length, then its
    bytes), exactly `count` of them filling `data`: an object array of bytes."""
    if count * 4 > len(data):
        # Each element takes 4 bytes at least: a declared shape the data cannot fill is
        # refused before an array of its size is made (a tiny body cannot cost gigabytes).
        raise InvalidInput(
            f"input {name!r}: its {what} cannot hold the {count} BYTES elements of shape "
            f"{shape} (each a 4-byte little-endian length, then its bytes)"
        )
    elements = np.empty(count, dtype=object)
    view = memoryview(data)
    offset = 0
    for index in range(count):
        if offset + 4 > len(data):
            break
        length = int.from_bytes(view[offset : offset + 4], "little")
        offset += 4
        if offset + length > len(data):
            break
        elements[index] = bytes(view[offset : offset + length])
        offset += length
    else:
        if offset == len(data):
            return elements.reshape(shape)
    raise InvalidInput(
        f"input {name!r}: its {what} are not the {count} BYTES elements of shape {shape} "
        "(each a 4-byte little-endian length, then its bytes)"
    )


def _to_bytes(array: np.ndarray[Any, Any], spec: TensorSpec) -> bytes:
    if spec.dtype == "bfloat16":
        words = np.ascontiguousarray(array, dtype="<f4").view("<u4") >> 16
        return words.astype("<u2").tobytes()
    return np.ascontiguousarray(array, dtype=_DATATYPES[datatype(spec)]).tobytes()


def _output_choices(
    request: dict[str, Any], parameters: dict[str, Any], spec: ModelSpec
) -> list[OutputChoice]:
    """The outputs asked for (`outputs`; all, in the spec's order, when absent), each binary
    or JSON, and with its classification's class count.

    An output's own `binary_data` decides, as the binary tensor extension says; otherwise the
    request's `binary_data_output` (among its `parameters`, already checked)."""
    default = parameters.get("binary_data_output") is True
    outputs = request.get("outputs")
    if outputs is None:
        return [OutputChoice(t, default) for t in spec.output_specs]
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InvalidInput("'outputs' must be a list of objects")
    by_name = {t.name: t for t in spec.output_specs}
    choices: dict[str, OutputChoice] = {}
    for wanted in outputs:
        name = wanted.get("name")
        if name not in by_name:
            gives = ", ".join(map(repr, by_name))
            raise InvalidInput(f"unknown output {name!r}: the model gives {gives}")
        if name in choices:
            raise InvalidInput(f"output {name!r} is asked for twice")
        own = supported(wanted, _OUTPUT_PARAMETERS, f"output {name!r}")
        binary = own["binary_data"] is True if "binary_data" in own else default
        class_count = None
        for key in ("classification", "class_count"):
            if key in own:
                class_count = _positive_int(own[key], f"output {name!r}: {key} (class_count)")
        choices[name] = OutputChoice(by_name[name], binary, class_count)
    return list(choices.values())


def model_config(
    spec: ModelSpec,
    *,
    max_batch_size: int,
    preferred_batch_size: int,
    max_wait_ms: float,
    copies: Sequence[tuple[str, int | None, int]],
    versions: list[str],
    priority_levels: int = 0,
    default_priority_level: int = 0,
) -> dict[str, Any]:
    """The model configuration in Triton's JSON form, what perf_analyzer and model-analyzer
    read first. `copies` is (kind: cpu or cuda, GPU index, copies on it) per device;
    `versions` those loaded; with `priority_levels`, the levels and the default one."""

    def tensor(t: TensorSpec, dims: list[int]) -> dict[str, Any]:
        # Triton's configuration calls BYTES tensors TYPE_STRING.
        kind = "STRING" if t.dtype == "string" else datatype(t)
        config: dict[str, Any] = {"name": t.name, "data_type": f"TYPE_{kind}", "dims": dims}
        if list(t.shape) != dims:
            config["reshape"] = {"shape": list(t.shape)}
        return config

    return {
        "name": spec.name,
        "platform": PLATFORM,
        "backend": "pytorch",
        "version_policy": {"specific": {"versions": [int(v) for v in versions]}},
        "max_batch_size": max_batch_size,
        "input": [tensor(t, input_dims(t)) for t in spec.input_specs],
        "output": [tensor(t, list(t.shape)) for t in spec.output_specs],
        "dynamic_batching": {
            "preferred_batch_size": [preferred_batch_size],
            "max_queue_delay_microseconds": round(max_wait_ms * 1000),
            **(
                {
                    "priority_levels": priority_levels,
                    "default_priority_level": default_priority_level,
                }
                if priority_levels
                else {}
            ),
        },
        "instance_group": [
            {
                "name": f"{spec.name}_{i}",
                "kind": "KIND_GPU" if kind == "cuda" else "KIND_CPU",
                "count": count,
                **({"gpus": [index]} if kind == "cuda" and index is not None else {}),
            }
            for i, (kind, index, count) in enumerate(copies)
        ],
    }
