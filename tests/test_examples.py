"""Every example in examples/ is built, served from its own config, and checked against the
model called directly. `all.toml` serves the five from one server."""

from __future__ import annotations

import json
import runpy
import shutil
import sys
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from gpuserve.config import Settings
from gpuserve.handler import softmax
from gpuserve.http import create_app

from .helpers import ROOT, ServerProcess, serving, wait_ready

pytestmark = pytest.mark.anyio

EXAMPLES = (
    "torchscript_image",
    "export_regressor",
    "factory_safetensors",
    "tokens",
    "text_classifier",
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of examples/ with every model built, as the working directory of the configs."""
    root = tmp_path_factory.mktemp("examples")
    shutil.copytree(
        ROOT / "examples", root / "examples", ignore=shutil.ignore_patterns("artifacts")
    )
    for name in EXAMPLES:
        script = root / "examples" / name / "build.py"
        runpy.run_path(str(script), run_name=f"example_{name}")["build"](
            script.parent / "artifacts"
        )
    path = list(sys.path)
    yield root
    sys.path[:] = path  # the configs' code_dir entries


@pytest.fixture
async def client(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    monkeypatch.chdir(workdir)
    settings = Settings(config_file=Path("examples/all.toml"), device="cpu")
    async with serving(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_config_names_its_model(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(workdir)
    settings = Settings(config_file=Path(f"examples/{name}/config.toml"))
    (model,) = settings.served_models
    assert model.key in {"cnn", "regressor", "scorer", "sentiment", "text"}


async def predict(client: httpx.AsyncClient, model: str, instances: list[Any]) -> list[Any]:
    response = await client.post(f"/models/{model}/predict", json={"instances": instances})
    assert response.status_code == 200, response.text
    outputs: list[Any] = response.json()["outputs"]
    return outputs


async def test_the_torchscript_image_model(client: httpx.AsyncClient, workdir: Path) -> None:
    images = np.random.default_rng(0).integers(0, 17, (3, 1, 8, 8)).astype(np.float32)
    served = await predict(client, "cnn", images.tolist())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(workdir / "examples/torchscript_image/artifacts/cnn.pt"))
    expected = torch.softmax(module(torch.from_numpy(images)), -1).detach().numpy()
    np.testing.assert_allclose([out["probabilities"] for out in served], expected, atol=1e-6)


async def test_the_exported_regressor(client: httpx.AsyncClient, workdir: Path) -> None:
    features = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    served = await predict(client, "regressor", features.tolist())
    program = torch.export.load(str(workdir / "examples/export_regressor/artifacts/regressor.pt2"))
    expected = program.module()(torch.from_numpy(features)).detach().numpy()
    np.testing.assert_allclose(served, expected, atol=1e-6)


async def test_the_factory_with_safetensors_weights(
    client: httpx.AsyncClient, workdir: Path
) -> None:
    from safetensors.torch import load_file

    x = np.random.default_rng(2).standard_normal((2, 16)).astype(np.float32)
    served = await predict(client, "scorer", x.tolist())
    folder = workdir / "examples/factory_safetensors"
    module = runpy.run_path(str(folder / "factory_model.py"))["build"](features=16, hidden=32)
    module.load_state_dict(load_file(str(folder / "artifacts/scorer.safetensors")))
    expected = torch.softmax(module(torch.from_numpy(x)), -1).detach().numpy()
    np.testing.assert_allclose([out["probabilities"] for out in served], expected, atol=1e-6)
    assert served[0]["label"] in {"low", "mid", "high"}


async def test_variable_length_tokens_batched_equal_each_alone(
    client: httpx.AsyncClient, workdir: Path
) -> None:
    rng = np.random.default_rng(3)
    # Lengths across three buckets; the long one must not change the short ones' answers.
    sequences = [rng.integers(2, 1000, n).tolist() for n in (3, 20, 5, 100, 12, 40, 1)]
    together = await predict(client, "sentiment", sequences)
    alone = [(await predict(client, "sentiment", [seq]))[0] for seq in sequences]
    for batched, single in zip(together, alone, strict=True):
        assert batched["label"] == single["label"]
        assert batched["score"] == pytest.approx(single["score"], abs=1e-5)

    folder = workdir / "examples/tokens"
    namespace = runpy.run_path(str(folder / "token_model.py"))
    from safetensors.torch import load_file

    module = namespace["build"]().eval()
    module.load_state_dict(load_file(str(folder / "artifacts/tokens.safetensors")))
    ids = torch.tensor([[namespace["CLS"], *sequences[0]]])
    with torch.inference_mode():
        probabilities = torch.softmax(module(ids, torch.ones_like(ids, dtype=torch.bool)), -1)
    assert together[0]["score"] == pytest.approx(float(probabilities.max()), abs=1e-5)

    metrics = (await client.get("/metrics")).text
    # With CLS, lengths 4, 21, 6, 101, 13, 41, 2 fall in 4 buckets (16, 32, 64, 128): the
    # 7-sequence request ran as 4 batches, then 7 batches of one.
    assert 'gpuserve_batch_size_count{model="sentiment",version="1"} 11.0' in metrics


async def test_token_input_beyond_its_bound_is_a_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/models/sentiment/predict", json={"inputs": [5] * 128})
    assert response.status_code == 422
    assert "at most [127]" in response.json()["error"]
    ready = (await client.get("/health/ready")).json()
    assert set(ready["models"]) == {"cnn", "regressor", "scorer", "sentiment", "text"}
    assert ready["status"] == "ready"


TEXTS = ["the food was wonderful", "I found the film BORING", "our trip is really lovely", ""]


def text_probabilities(workdir: Path, texts: list[str]) -> np.ndarray[Any, Any]:
    """The text example's tokenizer and model called directly, one text at a time."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    folder = workdir / "examples/text_classifier"
    module = runpy.run_path(str(folder / "text_model.py"))["build"]().eval()
    module.load_state_dict(load_file(str(folder / "artifacts/text.safetensors")))
    tokenizer = Tokenizer.from_file(str(folder / "artifacts/tokenizer.json"))
    rows = []
    for text in texts:
        ids = torch.tensor([tokenizer.encode(text).ids or [tokenizer.token_to_id("[UNK]")]])
        with torch.inference_mode():
            rows.append(torch.softmax(module(ids, torch.ones_like(ids, dtype=torch.bool)), -1)[0])
    return torch.stack(rows).numpy()


async def test_the_text_classifier_serves_raw_text(
    client: httpx.AsyncClient, workdir: Path
) -> None:
    served = await predict(client, "text", TEXTS)
    expected = text_probabilities(workdir, TEXTS)
    np.testing.assert_allclose([out["probabilities"] for out in served], expected, atol=1e-6)
    assert [out["label"] for out in served[:3]] == ["positive", "negative", "positive"]
    one = await client.post("/models/text/predict", json={"inputs": "the book was awful"})
    assert one.json()["outputs"]["label"] == "negative"
    # The same texts as a BYTES tensor over v2: the model's logits, whose softmax matches.
    tensor = {"name": "text", "shape": [len(TEXTS)], "datatype": "BYTES", "data": TEXTS}
    v2 = await client.post("/v2/models/text/infer", json={"inputs": [tensor]})
    assert v2.status_code == 200, v2.text
    logits = np.array(v2.json()["outputs"][0]["data"], dtype=np.float32).reshape(-1, 2)
    np.testing.assert_allclose(softmax(logits), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"inputs": 3}, "expected string, got integers"),
        ({"inputs": ["a", "b"]}, "got shape [2]"),
        ({"instances": [["a"]]}, "got shape [1]"),
    ],
)
async def test_text_that_is_not_one_string_is_a_422(
    client: httpx.AsyncClient, body: dict[str, Any], expected: str
) -> None:
    response = await client.post("/models/text/predict", json=body)
    assert response.status_code == 422 and expected in response.json()["error"]


def test_the_text_classifier_over_triton_clients(workdir: Path) -> None:
    """Raw text through tritonclient over HTTP (JSON and binary BYTES) and gRPC (raw and
    typed contents): the same numbers as /predict, and clear errors for broken BYTES."""
    import grpc
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    texts = np.array([text.encode() for text in TEXTS], dtype=object)
    expected = text_probabilities(workdir, TEXTS)
    config = "examples/text_classifier/config.toml"
    with ServerProcess("--config", config, "--device", "cpu", cwd=workdir) as server:
        wait_ready(server.url)
        http = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
        # One text per instance, described as Triton describes it (tools such as
        # perf_analyzer generate inputs from these): [N, 1], reshaped to [N] for the model.
        assert http.get_model_metadata("text")["inputs"][0]["shape"] == [-1, 1]
        (described,) = http.get_model_config("text")["input"]
        assert (described["dims"], described["reshape"]) == ([1], {"shape": []})
        for binary in (False, True):
            for shape in ([len(TEXTS)], [len(TEXTS), 1]):
                tensor = triton_http.InferInput("text", shape, "BYTES")
                tensor.set_data_from_numpy(texts.reshape(shape), binary_data=binary)
                logits = http.infer("text", [tensor]).as_numpy("logits")
                np.testing.assert_allclose(softmax(logits), expected, atol=1e-6)
        client = triton_grpc.InferenceServerClient(server.grpc_url)
        config = client.get_model_config("text", as_json=True)["config"]
        assert config["input"][0]["reshape"] == {} and config["input"][0]["dims"] == ["1"]
        tensor = triton_grpc.InferInput("text", [len(TEXTS), 1], "BYTES")
        tensor.set_data_from_numpy(texts.reshape(-1, 1))
        logits = client.infer("text", [tensor]).as_numpy("logits")
        np.testing.assert_allclose(softmax(logits), expected, atol=1e-6)
        tensor = triton_grpc.InferInput("text", [len(TEXTS)], "BYTES")
        tensor.set_data_from_numpy(texts)
        classes = client.infer(
            "text", [tensor], outputs=[triton_grpc.InferRequestedOutput("logits", class_count=1)]
        ).as_numpy("logits")
        assert classes[0, 0].decode().endswith(":positive")

        with grpc.insecure_channel(server.grpc_url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            typed = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1])
            typed.contents.bytes_contents.append(TEXTS[0].encode())
            answer = stub.ModelInfer(pb.ModelInferRequest(model_name="text", inputs=[typed]))
            row = np.frombuffer(answer.raw_output_contents[0], dtype="<f4")
            np.testing.assert_allclose(softmax(row), expected[0], atol=1e-6)
            for broken, problem in (
                (b"\x05\x00\x00\x00abc", "not the 1 BYTES elements"),  # a length past the end
                (b"\x03\x00\x00\x00abcd", "not the 1 BYTES elements"),  # bytes left over
                (b"\x02\x00\x00\x00\xff\xfe", "UTF-8"),
            ):
                raw = pb.ModelInferRequest.InferInputTensor(
                    name="text", datatype="BYTES", shape=[1]
                )
                request = pb.ModelInferRequest(
                    model_name="text", inputs=[raw], raw_input_contents=[broken]
                )
                with pytest.raises(grpc.RpcError) as caught:
                    stub.ModelInfer(request)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert problem in caught.value.details()
        predicted = httpx.post(f"{server.url}/predict", json={"instances": TEXTS}).json()
        served = [out["probabilities"] for out in predicted["outputs"]]
        np.testing.assert_allclose(served, expected, atol=1e-6)
        assert server.stop() == 0


async def test_broken_binary_bytes_are_a_400_naming_the_layout(client: httpx.AsyncClient) -> None:
    async def send(payload: bytes) -> httpx.Response:
        tensor = {"name": "text", "shape": [1], "datatype": "BYTES"}
        tensor["parameters"] = {"binary_data_size": len(payload)}
        header = json.dumps({"inputs": [tensor]}).encode()
        length = {"inference-header-content-length": str(len(header))}
        return await client.post("/v2/models/text/infer", content=header + payload, headers=length)

    broken = await send(b"\x09\x00\x00\x00short")  # says 9 bytes, holds 5
    assert broken.status_code == 400
    assert "4-byte little-endian length" in broken.json()["error"]
    good = await send(len(b"fine").to_bytes(4, "little") + b"fine")
    assert good.status_code == 200 and good.json()["outputs"][0]["shape"] == [1, 2]
