"""Instance validation against the model's spec, and reading spec files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpuserve.core.errors import InvalidInput, ModelLoadError
from gpuserve.protocols.status import Protocol, http_status
from gpuserve.spec import (
    ModelSpec,
    TensorSpec,
    _checked,
    _checked_fully,
    block_to_arrays,
    to_array,
    to_arrays,
)

PIXELS = TensorSpec(name="pixels", shape=(4,), dtype="float32", min=0, max=16)


def test_a_valid_instance_becomes_an_array_of_the_spec_dtype() -> None:
    array = to_array([0, 1, 2.5, 16], PIXELS, "inputs")
    assert array.dtype == np.float32
    assert array.tolist() == [0.0, 1.0, 2.5, 16.0]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1, 2, 3], "got shape [3]"),
        ([[1, 2, 3, 4]], "got shape [1, 4]"),
        ([1, 2, "3", 4], "got strings"),
        ("1234", "got a string"),
        ({"a": 1}, "got an object"),
        (None, "got null"),
        ([True, False, True, False], "got booleans"),
        ([1, 2, None, 4], "got nulls"),
        ([1, 2, [3], 4], "ragged"),
        ([1, 2, 10**30, 4], "too large"),
        ([1, 2, float("nan"), 4], "NaN or infinity"),
        ([1, 2, float("inf"), 4], "NaN or infinity"),
        ([1, 2, 3, 17], "must be <= 16"),
        ([1, 2, 3, -1], "must be >= 0"),
        ([], "got shape [0]"),
    ],
)
def test_invalid_instances_name_the_field_and_the_expected_shape(value: Any, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        to_array(value, PIXELS, "instances[2]")
    assert caught.value.message.startswith("instances[2]: ")
    assert message in caught.value.message
    assert http_status(caught.value.kind, Protocol.PREDICT) == 422


def test_float_values_that_overflow_a_narrow_dtype_are_rejected() -> None:
    half = TensorSpec(shape=(1,), dtype="float16")
    with pytest.raises(InvalidInput, match="overflow float16"):
        to_array([1e6], half, "inputs")


def test_integer_specs_refuse_floats_and_out_of_range_values() -> None:
    tokens = TensorSpec(shape=(-1,), dtype="int32")
    assert to_array([1, 2, 3], tokens, "inputs").dtype == np.int32
    with pytest.raises(InvalidInput, match="got floats"):
        to_array([1.5], tokens, "inputs")
    with pytest.raises(InvalidInput, match="do not fit in int32"):
        to_array([2**40], tokens, "inputs")


def test_variable_dimensions_accept_any_size() -> None:
    spec = TensorSpec(shape=(-1, 2))
    assert to_array([[1, 2], [3, 4], [5, 6]], spec, "inputs").shape == (3, 2)
    assert spec.describe() == "float32[N, 2]"
    assert spec.example().shape == (1, 2)


def test_bool_spec_takes_only_booleans() -> None:
    flags = TensorSpec(shape=(2,), dtype="bool")
    assert to_array([True, False], flags, "inputs").tolist() == [True, False]
    with pytest.raises(InvalidInput, match="got integers"):
        to_array([1, 0], flags, "inputs")


def test_spec_rejects_labels_that_do_not_match_the_output() -> None:
    with pytest.raises(ValueError, match="3 labels"):
        ModelSpec(
            name="m",
            input=TensorSpec(shape=(2,)),
            output=TensorSpec(shape=(2,)),
            labels=["a", "b", "c"],
        )


def test_spec_rejects_zero_dimensions() -> None:
    with pytest.raises(ValueError, match="dimension"):
        TensorSpec(shape=(0,))


def test_spec_round_trips_through_a_file(tmp_path: Path) -> None:
    spec = ModelSpec(name="m", input=PIXELS, output=TensorSpec(shape=(2,)), labels=["no", "yes"])
    spec.to_file(tmp_path / "m.json")
    assert ModelSpec.from_file(tmp_path / "m.json") == spec


def test_missing_or_invalid_spec_files_are_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        ModelSpec.from_file(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "m"}')
    with pytest.raises(ModelLoadError, match="invalid"):
        ModelSpec.from_file(bad)


def test_integral_floats_are_accepted_for_integer_specs() -> None:
    tokens = TensorSpec(shape=(2,), dtype="int64")
    array = to_array([3.0, 4.0], tokens, "inputs")
    assert array.dtype == np.int64 and array.tolist() == [3, 4]


def test_json_schema_describes_shape_dtype_and_range() -> None:
    schema = PIXELS.json_schema()
    assert schema == {
        "type": "array",
        "items": {"type": "number", "minimum": 0, "maximum": 16},
        "minItems": 4,
        "maxItems": 4,
    }
    tokens = TensorSpec(shape=(-1,), dtype="uint8").json_schema()
    assert tokens["minItems"] == 1 and "maxItems" not in tokens
    assert tokens["items"] == {"type": "integer", "minimum": 0, "maximum": 255}
    assert TensorSpec(shape=(1,), dtype="bool").json_schema()["items"] == {"type": "boolean"}


def test_samples_are_valid_instances() -> None:
    rng = np.random.default_rng(1)
    for tensor in (PIXELS, TensorSpec(shape=(-1,), dtype="int64", min=0, max=9)):
        sample = tensor.sample(rng)
        assert to_array(sample.tolist(), tensor, "inputs").shape == sample.shape


def test_instances_that_stack_are_checked_as_one_block() -> None:
    arrays = to_arrays([[0, 1, 2, 3], [4, 5, 6, 7.5]], PIXELS, "instances")
    assert [a.tolist() for a in arrays] == [[0, 1, 2, 3], [4, 5, 6, 7.5]]
    assert all(a.dtype == np.float32 for a in arrays)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([[0, 1, 2, 3], [0, 1, 2, 99]], "instances[1]: values must be <= 16"),
        ([[0, 1, 2, 3], [0, 1, 2]], "instances[1]: expected float32[4], got shape [3]"),
        ([[0, 1, 2, 3], "x"], "instances[1]: expected float32[4], got a string"),
        ([[0, 1, 2, float("nan")], [0, 1, 2, 3]], "instances[0]: expected float32[4], got NaN"),
    ],
)
def test_a_bad_instance_in_a_block_is_named(values: list[Any], message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        to_arrays(values, PIXELS, "instances")
    assert caught.value.message.startswith(message)


def test_variable_dimensions_may_have_an_upper_bound() -> None:
    tokens = TensorSpec(shape=(-1, 4), dtype="int64", max_shape=(16, 4))
    assert tokens.variable and tokens.fits((16, 4)) and not tokens.fits((17, 4))
    assert not tokens.fits((3, 5))
    with pytest.raises(InvalidInput, match=r"at most \[16, 4\].*got shape \[17, 4\]"):
        to_array(np.zeros((17, 4), np.int64).tolist(), tokens, "inputs")
    schema = tokens.json_schema()
    assert (schema["minItems"], schema["maxItems"]) == (1, 16)
    assert tokens.example(40).shape == (16, 4) and tokens.sample(np.random.default_rng()).shape == (
        8,
        4,
    )


@pytest.mark.parametrize("max_shape", [(16,), (16, 5), (0, 4)])
def test_a_bound_must_fit_the_shape(max_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="max_shape"):
        TensorSpec(shape=(-1, 4), max_shape=max_shape)


def test_an_inline_spec_takes_the_served_name() -> None:
    spec = ModelSpec.resolve({"input": {"shape": [2]}, "output": {"shape": [1]}}, "mine")
    assert spec.name == "mine"
    with pytest.raises(ModelLoadError, match="inline spec of mine is invalid"):
        ModelSpec.resolve({"input": {"shape": [2]}}, "mine")


def test_a_spec_file_without_a_name_is_served_under_the_models_name(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text('{"input": {"shape": [4]}, "output": {"shape": [2]}}')
    assert ModelSpec.from_file(path).name == "mine"
    assert ModelSpec.resolve(path, "served-as").name == "served-as"


def test_an_invalid_spec_file_says_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"input": {"shape": "four"}, "output": {"shape": [2]}}')
    with pytest.raises(ModelLoadError) as caught:
        ModelSpec.from_file(path)
    message = caught.value.message
    assert message.startswith(f"model spec {path} is invalid: input.shape")
    assert "\n" not in message and "errors.pydantic.dev" not in message
    path.write_text("{not json")
    with pytest.raises(ModelLoadError, match="is not valid JSON"):
        ModelSpec.from_file(path)


TEXT = TensorSpec(name="text", shape=(), dtype="string")


def test_string_instances_become_str_objects_from_text_or_utf8_bytes() -> None:
    one = to_array("héllo", TEXT, "inputs")
    assert one.dtype == object and one.item() == "héllo"
    from_bytes = block_to_arrays(np.array([b"caf\xc3\xa9", b"a\x00"], dtype=object), TEXT, "t")
    assert [item for item in from_bytes] == ["café", "a\x00"]  # NUL kept: no numpy strings
    assert [a.item() for a in to_arrays(["a", "b"], TEXT, "instances")] == ["a", "b"]
    assert TEXT.json_schema() == {"type": "string"}
    assert TEXT.describe() == "string"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (3, "inputs: expected string, got integers"),
        (["a"], "inputs: expected string, got shape [1]"),
        (None, "got null"),
        ({"text": "a"}, "got an object"),
    ],
)
def test_string_specs_refuse_what_is_not_one_string(value: Any, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        to_array(value, TEXT, "inputs")


def test_bytes_that_are_not_utf8_are_refused() -> None:
    with pytest.raises(InvalidInput, match="UTF-8"):
        block_to_arrays(np.array([b"\xff"], dtype=object), TEXT, "text")
    with pytest.raises(InvalidInput, match="got int values"):
        block_to_arrays(np.array([b"a", 3], dtype=object), TEXT, "text")


_F32_TOP = float(np.finfo(np.float32).max)
_QUICK_SPECS = [
    TensorSpec(shape=(3,)),
    TensorSpec(shape=(3,), min=-1, max=1),
    TensorSpec(shape=(3,), dtype="float16"),
    TensorSpec(shape=(3,), dtype="bfloat16", min=0),
    TensorSpec(shape=(3,), dtype="float64"),
    TensorSpec(shape=(), max=2),
]
_QUICK_VALUES: list[Any] = [
    [0.5, -0.25, 1.0],
    [1, 2, 3],  # integers, to a float tensor
    [-1.0, 0.0, 1.0],  # on the bounds
    [-1.0000001, 0.0, 1.0],
    [1.0, float("nan"), 1.0],
    [float("inf"), 0.0, 0.0],
    [-float("inf"), 0.0, 0.0],
    [65504.0, 0.0, -65504.0],
    [65520.0, 0.0, 0.0],  # rounds to infinity in float16
    [_F32_TOP, 0.0, 0.0],
    [_F32_TOP * (1 + 2**-25), 0.0, 0.0],  # above float32's top, yet rounds down to it
    [_F32_TOP * (1 + 2**-23), 0.0, 0.0],
    [1e300, 0.0, 0.0],
    [2**62, 0, -(2**62)],
    [0.5, 1.5],
    [[0.5, 1.5, 2.5]],
    [],
    1.5,
    3.0,
]


@pytest.mark.parametrize("spec", _QUICK_SPECS, ids=lambda s: f"{s.dtype}{list(s.shape)}")
@pytest.mark.parametrize("value", _QUICK_VALUES, ids=repr)
@pytest.mark.parametrize("batched", [False, True])
def test_the_quick_check_agrees_with_the_full_checks(
    spec: TensorSpec, value: Any, batched: bool
) -> None:
    """A float tensor's common input is accepted in two reductions: for every input the
    answer (the array, or the error) is the one the checks one by one give."""
    array = np.asarray([value, value] if batched else value)

    def outcome(check: Any) -> tuple[str, Any]:
        try:
            with np.errstate(all="ignore"):
                result = check(array, spec, "inputs", batched)
        except InvalidInput as exc:
            return "refused", exc.message
        return str(result.dtype), result.tolist()

    expected = outcome(_checked_fully)
    assert outcome(_checked) == expected
    if expected[0] != "refused":
        assert np.dtype(expected[0]) == spec.numpy_dtype


def test_only_float_tensors_of_fixed_shape_have_a_quick_check() -> None:
    assert TensorSpec(shape=(3,), min=0).plain_check is not None
    assert TensorSpec(shape=(-1,)).plain_check is None  # its shape is checked against bounds
    assert TensorSpec(shape=(3,), dtype="int64").plain_check is None
    assert TensorSpec(shape=(3,), dtype="string").plain_check is None


def test_an_output_given_no_name_is_called_output() -> None:
    one = {"name": "m", "input": {"shape": [4]}}
    from_dict = ModelSpec.model_validate({**one, "output": {"shape": [3]}})
    built = ModelSpec(name="m", input=TensorSpec(shape=(4,)), output=TensorSpec(shape=(3,)))
    listed = ModelSpec.model_validate({**one, "outputs": [{"shape": [3]}]})
    for spec in (from_dict, built, listed):
        assert spec.input is not None and spec.output is not None
        assert (spec.input.name, spec.output.name) == ("input", "output")
    named = ModelSpec(
        name="m", input=TensorSpec(shape=(4,)), output=TensorSpec(name="input", shape=(3,))
    )
    assert named.output is not None and named.output.name == "input"  # asked for: kept
