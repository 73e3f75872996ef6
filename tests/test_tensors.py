"""Several named inputs and outputs per model, end to end: the spec, /predict, v2 over HTTP
and gRPC (in-process and with tritonclient on real sockets), batching and padding per input."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as triton_aio
from pydantic import ValidationError
from tritonclient.grpc import service_pb2 as pb

from gpuserve.config import ModelSettings, Settings
from gpuserve.core.errors import InferenceError, ModelLoadError
from gpuserve.handler import Handler
from gpuserve.http import create_app
from gpuserve.model.device import DeviceInfo
from gpuserve.model.runner import Runner
from gpuserve.model.sources import load_program, spec_from_program
from gpuserve.spec import ModelSpec, TensorSpec

from .helpers import ServerProcess, both, serving, wait_ready

pytestmark = pytest.mark.anyio

CPU = DeviceInfo(device="cpu", kind="cpu", name="cpu", reason="test")


class TwoTower(torch.nn.Module):
    """features [B, 4] and token ids [B, L] (0 pads: its embedding is zero) in; a score
    [B, 1] and an embedding [B, 3] out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.embed = torch.nn.Embedding(50, 3, padding_idx=0)
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, features: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mixed = self.linear(features) + self.embed(ids).sum(1)
        return mixed.sum(-1, keepdim=True), mixed


SPEC = {
    "inputs": [
        {"name": "features", "shape": [4]},
        {"name": "ids", "shape": [-1], "dtype": "int64", "min": 0, "max": 49, "max_shape": [16]},
    ],
    "outputs": [{"name": "score", "shape": [1]}, {"name": "embedding", "shape": [3]}],
}


@pytest.fixture(scope="module")
def two_tower(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tensors") / "towers.pt2"
    batch, length = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("length", max=16)
    program = torch.export.export(
        TwoTower().eval(),
        (torch.zeros(2, 4), torch.ones(2, 5, dtype=torch.int64)),
        dynamic_shapes=({0: batch}, {0: batch, 1: length}),
    )
    torch.export.save(program, str(path))
    path.with_suffix(".json").write_text(json.dumps({"name": "towers", **SPEC}))
    return path


def direct(features: list[float], ids: list[int]) -> tuple[np.ndarray[Any, Any], ...]:
    with torch.inference_mode():
        score, embedding = TwoTower()(torch.tensor([features]), torch.tensor([ids]))
    return score[0].numpy(), embedding[0].numpy()


INSTANCES = [
    {"features": [0.5, -1.0, 2.0, 0.0], "ids": [3, 4, 5]},
    {"features": [1.0, 1.0, 1.0, 1.0], "ids": [7]},
    {"features": [-2.0, 0.25, 0.0, 3.0], "ids": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]},
]


@pytest.fixture
async def client(two_tower: Path) -> AsyncIterator[httpx.AsyncClient]:
    model = ModelSettings(path=two_tower, freeze_gc=False, max_wait_ms=50)
    async with serving(create_app(Settings(device="cpu", model=model))) as client:
        yield client


def test_the_spec_lists_named_tensors_and_refuses_ambiguity() -> None:
    spec = ModelSpec(name="m", **SPEC)  # type: ignore[arg-type]
    assert [t.name for t in spec.input_specs] == ["features", "ids"]
    assert spec.input is None and spec.describe_inputs() == "{features: float32[4], ids: int64[N]}"
    one = ModelSpec(name="m", inputs=[TensorSpec(shape=(2,))], output=TensorSpec(shape=(1,)))
    assert one.input == TensorSpec(shape=(2,)) and one.inputs is None  # one way to say one
    for bad, problem in (
        ({**SPEC, "input": {"shape": [4]}}, "exactly one of 'input'"),
        (
            {**SPEC, "inputs": [{"name": "a", "shape": [1]}, {"name": "a", "shape": [2]}]},
            "distinct",
        ),
        ({**SPEC, "labels": ["x", "y", "z"]}, "labels need a model of one output"),
        ({"inputs": [], "outputs": SPEC["outputs"]}, "distinct names"),
    ):
        with pytest.raises(ValidationError, match=problem):
            ModelSpec(name="m", **bad)


def test_the_spec_of_an_exported_program_of_several_tensors_is_inferred(two_tower: Path) -> None:
    spec = spec_from_program(load_program(two_tower), "towers", two_tower, 8)
    assert [(t.name, t.shape, t.dtype) for t in spec.input_specs] == [
        ("features", (4,), "float32"),
        ("ids", (-1,), "int64"),
    ]
    assert spec.input_specs[1].max_shape == (16,)
    assert [(t.name, t.shape) for t in spec.output_specs] == [
        ("output_0", (1,)),
        ("output_1", (3,)),
    ]


async def test_predict_takes_an_object_of_inputs_and_answers_each_output(
    client: httpx.AsyncClient,
) -> None:
    one = await client.post("/predict", json={"inputs": INSTANCES[0]})
    assert one.status_code == 200, one.text
    score, embedding = direct(**INSTANCES[0])
    outputs = one.json()["outputs"]
    np.testing.assert_allclose(outputs["score"], score, atol=1e-6)
    np.testing.assert_allclose(outputs["embedding"], embedding, atol=1e-6)
    # Ids of three lengths in one batch, padded per input: each gets what it gets alone.
    several = (await client.post("/predict", json={"instances": INSTANCES})).json()["outputs"]
    for instance, answer in zip(INSTANCES, several, strict=True):
        score, embedding = direct(**instance)
        np.testing.assert_allclose(answer["score"], score, atol=1e-6)
        np.testing.assert_allclose(answer["embedding"], embedding, atol=1e-6)


@pytest.mark.parametrize(
    ("inputs", "problem"),
    [
        ({"features": [1.0] * 4}, "missing ['ids']"),
        ({**INSTANCES[0], "extra": [1]}, "unknown ['extra']"),
        ([1.0, 2.0], "expected an object of the inputs"),
        ({"features": [1.0] * 3, "ids": [1]}, "inputs.features: expected float32[4]"),
        ({"features": [1.0] * 4, "ids": [1] * 17}, "inputs.ids: expected int64[N] (at most [16])"),
    ],
)
async def test_predict_names_the_input_at_fault(
    client: httpx.AsyncClient, inputs: Any, problem: str
) -> None:
    response = await client.post("/predict", json={"inputs": inputs})
    assert response.status_code == 422 and problem in response.json()["error"]


def v2_inputs(instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Two v2 tensors for instances whose ids have one length (a tensor is rectangular)."""
    features = [i["features"] for i in instances]
    ids = [i["ids"] for i in instances]
    return [
        {"name": "features", "shape": [len(features), 4], "datatype": "FP32", "data": features},
        {"name": "ids", "shape": [len(ids), len(ids[0])], "datatype": "INT64", "data": ids},
    ]


async def test_v2_takes_every_input_and_gives_the_outputs_asked_for(
    client: httpx.AsyncClient,
) -> None:
    pair = [INSTANCES[0], {"features": [0.0, 1.0, 0.0, 1.0], "ids": [9, 8, 7]}]
    body = (await client.post("/v2/models/towers/infer", json={"inputs": v2_inputs(pair)})).json()
    assert [o["name"] for o in body["outputs"]] == ["score", "embedding"]
    assert body["outputs"][1]["shape"] == [2, 3]
    expected = [direct(**instance) for instance in pair]
    np.testing.assert_allclose(body["outputs"][0]["data"], [s[0] for s, _ in expected], atol=1e-6)
    # One output, as binary data; the other not asked for.
    wanted = [{"name": "embedding", "parameters": {"binary_data": True}}]
    response = await client.post(
        "/v2/models/towers/infer", json={"inputs": v2_inputs(pair), "outputs": wanted}
    )
    length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:length])
    assert [o["name"] for o in header["outputs"]] == ["embedding"]
    got = np.frombuffer(response.content[length:], dtype="<f4").reshape(2, 3)
    np.testing.assert_allclose(got, [e for _, e in expected], atol=1e-6)
    meta = (await client.get("/v2/models/towers")).json()
    assert [(t["name"], t["shape"]) for t in meta["inputs"]] == [
        ("features", [-1, 4]),
        ("ids", [-1, -1]),
    ]
    config = (await client.get("/v2/models/towers/config")).json()
    assert [t["name"] for t in config["output"]] == ["score", "embedding"]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda inputs: inputs[:1], "missing input 'ids'"),
        (lambda inputs: [*inputs, inputs[0]], "input 'features' is given twice"),
        (lambda inputs: [inputs[0], {**inputs[1], "name": "tokens"}], "unknown input 'tokens'"),
        (
            lambda inputs: [
                {**inputs[0], "shape": [1, 4], "data": inputs[0]["data"][:1]},
                inputs[1],
            ],
            "the same number of instances",
        ),
    ],
)
async def test_v2_refuses_inputs_that_do_not_match(
    client: httpx.AsyncClient, change: Any, problem: str
) -> None:
    pair = [INSTANCES[0], {"features": [0.0, 1.0, 0.0, 1.0], "ids": [9, 8, 7]}]
    response = await client.post(
        "/v2/models/towers/infer", json={"inputs": change(v2_inputs(pair))}
    )
    assert response.status_code == 400 and problem in response.json()["error"], response.text
    unknown = await client.post(
        "/v2/models/towers/infer",
        json={"inputs": v2_inputs(pair), "outputs": [{"name": "logits"}]},
    )
    assert "unknown output 'logits': the model gives 'score', 'embedding'" in unknown.text


async def test_grpc_takes_several_inputs_and_answers_several_outputs(two_tower: Path) -> None:
    model = ModelSettings(path=two_tower, freeze_gc=False)
    async with both(Settings(device="cpu", model=model)) as servers:
        features = triton_aio.InferInput("features", [1, 4], "FP32")
        features.set_data_from_numpy(np.array([INSTANCES[0]["features"]], dtype=np.float32))
        ids = triton_aio.InferInput("ids", [1, 3], "INT64")
        ids.set_data_from_numpy(np.array([INSTANCES[0]["ids"]], dtype=np.int64))
        result = await servers.grpc.infer("towers", [features, ids])
        score, embedding = direct(**INSTANCES[0])
        np.testing.assert_allclose(result.as_numpy("score")[0], score, atol=1e-6)
        np.testing.assert_allclose(result.as_numpy("embedding")[0], embedding, atol=1e-6)
        only = triton_aio.InferRequestedOutput("score")
        picked = await servers.grpc.infer("towers", [features, ids], outputs=[only])
        assert [o.name for o in picked.get_response().outputs] == ["score"]
        # Typed contents, each input in its own field (fp32_contents, int64_contents).
        typed_features = pb.ModelInferRequest.InferInputTensor(
            name="features", datatype="FP32", shape=[1, 4]
        )
        typed_features.contents.fp32_contents.extend(INSTANCES[0]["features"])
        typed_ids = pb.ModelInferRequest.InferInputTensor(
            name="ids", datatype="INT64", shape=[1, 3]
        )
        typed_ids.contents.int64_contents.extend(INSTANCES[0]["ids"])
        request = pb.ModelInferRequest(model_name="towers", inputs=[typed_features, typed_ids])
        answer = await servers.stub.ModelInfer(request)
        assert [o.name for o in answer.outputs] == ["score", "embedding"]
        got = np.frombuffer(answer.raw_output_contents[1], dtype="<f4")
        np.testing.assert_allclose(got, embedding, atol=1e-6)


def test_tritonclient_http_and_grpc_against_a_two_input_two_output_model(
    two_tower: Path,
) -> None:
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    features = np.array([i["features"] for i in INSTANCES[:2]], dtype=np.float32)
    ids = np.array([[3, 4, 5], [7, 0, 0]], dtype=np.int64)  # 0 pads: the same answers
    expected = [direct(**INSTANCES[0]), direct(**INSTANCES[1])]
    with ServerProcess(str(two_tower), "--device", "cpu") as server:
        wait_ready(server.url)
        http = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
        grpc_client = triton_grpc.InferenceServerClient(server.grpc_url)
        for module, client in ((triton_http, http), (triton_grpc, grpc_client)):
            tensors = [
                module.InferInput("features", [2, 4], "FP32"),
                module.InferInput("ids", [2, 3], "INT64"),
            ]
            tensors[0].set_data_from_numpy(features)
            tensors[1].set_data_from_numpy(ids)
            result = client.infer("towers", tensors)
            np.testing.assert_allclose(
                result.as_numpy("score"), [s for s, _ in expected], atol=1e-6
            )
            np.testing.assert_allclose(
                result.as_numpy("embedding"), [e for _, e in expected], atol=1e-6
            )
        grpc_client.close()
        assert server.stop() == 0


def test_a_handler_maps_dict_outputs_by_name_and_refuses_the_wrong_count() -> None:
    spec = ModelSpec(name="m", **SPEC)  # type: ignore[arg-type]

    class ByName(torch.nn.Module):
        def forward(self, features: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
            score, embedding = TwoTower()(features, ids)
            return {"embedding": embedding, "score": score}  # not in the spec's order

    handler = Runner(Handler(spec, CPU, module=ByName()))
    handler.warm_up()
    (row,) = handler([{k: np.asarray(v) for k, v in INSTANCES[0].items()}])
    score, embedding = direct(**INSTANCES[0])
    np.testing.assert_allclose(row["score"], score, atol=1e-6)
    np.testing.assert_allclose(row["embedding"], embedding, atol=1e-6)

    class One(torch.nn.Module):
        def forward(self, features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return features

    with pytest.raises(ModelLoadError, match="lists 2 outputs"):
        Runner(Handler(spec, CPU, module=One())).warm_up()


async def test_binary_inputs_follow_the_order_the_request_lists_them(
    client: httpx.AsyncClient,
) -> None:
    features = np.array([INSTANCES[0]["features"]], dtype="<f4")
    ids = np.array([INSTANCES[0]["ids"]], dtype="<i8")
    tensors = [  # ids first, unlike the spec; features as JSON, after it
        {"name": "ids", "shape": [1, 3], "datatype": "INT64"},
        {"name": "features", "shape": [1, 4], "datatype": "FP32"},
    ]
    tensors[0]["parameters"] = {"binary_data_size": ids.nbytes}
    for binary_features in (True, False):
        if binary_features:
            tensors[1]["parameters"] = {"binary_data_size": features.nbytes}
            tensors[1].pop("data", None)
            data = ids.tobytes() + features.tobytes()
        else:
            tensors[1].pop("parameters", None)
            tensors[1]["data"] = features.ravel().tolist()
            data = ids.tobytes()
        header = json.dumps({"inputs": tensors}).encode()
        response = await client.post(
            "/v2/models/towers/infer",
            content=header + data,
            headers={"inference-header-content-length": str(len(header))},
        )
        assert response.status_code == 200, response.text
        score = response.json()["outputs"][0]["data"]
        np.testing.assert_allclose(score, direct(**INSTANCES[0])[0], atol=1e-6)


async def test_openapi_describes_an_instance_as_an_object_of_the_inputs(
    client: httpx.AsyncClient,
) -> None:
    document = (await client.get("/openapi.json")).json()
    body = document["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    one = body["schema"]["oneOf"][0]["properties"]["inputs"]
    assert one["required"] == ["features", "ids"] and one["additionalProperties"] is False
    assert one["properties"]["ids"]["maxItems"] == 16


def test_a_row_with_nan_in_any_output_fails_alone() -> None:
    spec = ModelSpec(name="m", **SPEC)  # type: ignore[arg-type]

    class NanForNegative(torch.nn.Module):
        def forward(self, features: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
            score, embedding = TwoTower()(features, ids)
            broken = (features[:, :1] < 0).to(embedding.dtype)
            return score, embedding / (1 - broken)  # inf where the first feature is negative

    handler = Runner(Handler(spec, CPU, module=NanForNegative()))
    rows = handler([{k: np.asarray(v) for k, v in instance.items()} for instance in INSTANCES[1:]])
    assert isinstance(rows[1], InferenceError) and "NaN or infinite" in str(rows[1])
    np.testing.assert_allclose(rows[0]["score"], direct(**INSTANCES[1])[0], atol=1e-6)
