"""Fuzz the whole HTTP API from its own OpenAPI schema with schemathesis, on a real socket.

schemathesis' pytest plugin does not load under pytest 9 here, so its command line runs it:
every check (no 5xx, documented status codes and content types, schema-valid bodies accepted,
schema-invalid ones refused with a 4xx), then the server must still be ready.

The Open Inference Protocol's infer body gets every check but one: JSON Schema cannot say that
a tensor's `data` holds as many values as its `shape` asks for, so a schema-valid body can be
rightly refused, and "schema-valid bodies are accepted" does not hold there.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from .helpers import ServerProcess, wait_ready


def test_the_api_survives_schemathesis_with_every_check(demo_model: Path, tmp_path: Path) -> None:
    env = {"GPUSERVE_MODEL__PATH": str(demo_model)}
    with ServerProcess("--device", "cpu", env=env) as server:
        wait_ready(server.url)
        report = schemathesis(server.url, ["--exclude-path", INFER], tmp_path)
        assert "No issues found" in report, report[-6000:]
        # Its body schema is loose, so most generated bodies are refused: a warning, no failure.
        only = ["--include-path", INFER, "--exclude-checks", "positive_data_acceptance"]
        report = schemathesis(server.url, only, tmp_path)
        assert re.search(r"\d+ generated, \d+ passed", report), report[-6000:]
        assert httpx.get(f"{server.url}/health/ready").status_code == 200
        assert httpx.get(f"{server.url}/metrics").text.count('code="500"') == 0
        assert server.stop() == 0


INFER = "/v2/models/{name}/infer"


def schemathesis(url: str, selection: list[str], cwd: Path) -> str:
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            *selection,
            "--max-examples",
            "100",
            "--seed",
            "20261124",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,  # schemathesis leaves its cache where it runs
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-6000:]
    return report


# Property-based: the v2 infer route, JSON and binary, never answers 5xx. The bodies are mostly
# well formed, with each field replaced now and then by something hostile, so they reach deep
# into the decoder rather than stopping at the first check.
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
any_json = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
dims = st.one_of(
    st.integers(min_value=0, max_value=4),
    st.just(64),
    st.integers(min_value=2**31, max_value=2**70),
    st.integers(max_value=-1),
    json_leaf,
)


def maybe(
    strategy: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """`strategy` nine times in ten, `hostile` the tenth."""
    return st.integers(min_value=0, max_value=9).flatmap(
        lambda roll: hostile if roll == 9 else strategy
    )


@st.composite
def infer_requests(draw: st.DrawFn) -> tuple[dict[str, str], bytes]:
    rows = draw(maybe(st.integers(min_value=1, max_value=3), st.just(0)))
    shape = draw(maybe(st.just([rows, 64]), st.lists(dims, max_size=4) | any_json))
    datatype = draw(
        maybe(st.just("FP32"), st.sampled_from(["FP16", "INT64", "BF16", "BYTES", "x"]) | any_json)
    )
    binary = draw(st.booleans())
    values = [float(v % 16) for v in range(rows * 64)]
    tensor: dict[str, Any] = {
        "name": draw(maybe(st.just("pixels"), any_json)),
        "shape": shape,
        "datatype": datatype,
    }
    raw = b""
    if binary:
        raw = draw(maybe(st.just(struct.pack(f"<{len(values)}f", *values)), st.binary(max_size=64)))
        size = draw(
            maybe(st.just(len(raw)), any_json | st.integers(min_value=-(2**70), max_value=2**70))
        )
        tensor["parameters"] = draw(maybe(st.just({"binary_data_size": size}), any_json))
    else:
        tensor["data"] = draw(maybe(st.just(values), any_json))
        if draw(st.booleans()):
            tensor["parameters"] = draw(any_json)
    request: dict[str, Any] = {"inputs": draw(maybe(st.just([tensor]), any_json))}
    for key, value in (
        ("id", maybe(st.text(max_size=8), any_json)),
        ("parameters", maybe(st.just({"binary_data_output": True}), any_json)),
        ("outputs", maybe(st.just([{"name": "logits"}]), any_json)),
    ):
        if draw(st.booleans()):
            request[key] = draw(value)
    header = json.dumps(request).encode()
    headers = {"content-type": "application/octet-stream" if binary else "application/json"}
    if binary:
        length = draw(
            maybe(
                st.just(str(len(header))),
                st.sampled_from(["+10", "1_0", "0x10", "1e2", "-1", "0", "9" * 30, "x"]),
            )
        )
        headers["inference-header-content-length"] = length
    return headers, header + raw


def test_v2_infer_never_answers_5xx_to_any_body(demo_model: Path) -> None:
    env = {"GPUSERVE_MODEL__PATH": str(demo_model), "GPUSERVE_ACCESS_LOG": "false"}
    with (
        ServerProcess("--device", "cpu", env=env) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        wait_ready(server.url)
        seen: set[int] = set()

        @settings(max_examples=400, deadline=None, derandomize=True, database=None)
        @given(infer_requests())
        def check(request: tuple[dict[str, str], bytes]) -> None:
            headers, body = request
            response = client.post("/v2/models/digits/infer", content=body, headers=headers)
            seen.add(response.status_code)
            assert response.status_code < 500, (body[:300], response.text)
            if response.status_code >= 400:
                assert set(response.json()) == {"error", "request_id"}

        check()
        assert 200 in seen and 400 in seen  # the bodies reached both sides of the decoder
        assert client.get("/health/ready").status_code == 200
        assert server.stop() == 0
