"""Body decoding: the /predict decoder, and large bodies parsed in a separate process."""

from __future__ import annotations

import asyncio
import json
import os
import time

import numpy as np
import pytest
from pydantic import ValidationError

from gpuserve.core.errors import InferenceError, InvalidInput, NotReady
from gpuserve.core.offload import BodyDecoder
from gpuserve.protocols.predict import decode_predict, describe
from gpuserve.protocols.schemas import PredictRequest

from .helpers import FAKE_SPEC

pytestmark = pytest.mark.anyio

SPEC = FAKE_SPEC


def pid_of_decoder(body: bytes, delay_s: float = 0.0) -> int:
    time.sleep(delay_s)
    return os.getpid()


def die(body: bytes) -> None:
    os._exit(1)


def big_body(instances: int) -> bytes:
    return json.dumps({"instances": [[1.5, 2, 3, 4]] * instances}).encode()


def test_decode_predict_reads_inputs_and_instances() -> None:
    one = decode_predict(b'{"inputs": [1, 2, 3, 4]}', SPEC, 8)
    assert one.single and [a.tolist() for a in one.instances] == [[1, 2, 3, 4]]
    several = decode_predict(big_body(3), SPEC, 8)
    assert not several.single and len(several.instances) == 3
    with pytest.raises(InvalidInput, match="4 given, at most 3 allowed"):
        decode_predict(big_body(4), SPEC, 3)


def test_a_body_with_thousands_of_errors_gets_a_short_message() -> None:
    body = json.dumps({"inputs": [1, 2, 3, 4], **{f"k{i}": i for i in range(5000)}})
    with pytest.raises(ValidationError) as caught:
        PredictRequest.model_validate_json(body)
    assert describe(caught.value).endswith("; and 4995 more")
    with pytest.raises(InvalidInput) as refused:
        decode_predict(body.encode(), SPEC, 8)
    assert refused.value.message.startswith("k0: Extra inputs are not permitted")
    assert len(refused.value.message) < 300


async def test_a_small_body_is_decoded_inline() -> None:
    decoder = BodyDecoder(offload_bytes=1024, processes=1)
    assert await decoder.run(b"{}", pid_of_decoder) == os.getpid()
    decoder.close()


async def test_a_large_body_is_decoded_in_another_process_with_the_same_result() -> None:
    decoder = BodyDecoder(offload_bytes=1024, processes=1)
    body = big_body(500)
    try:
        assert await decoder.run(body, pid_of_decoder) != os.getpid()
        offloaded = await decoder.run(body, decode_predict, SPEC, 1024)
        inline = decode_predict(body, SPEC, 1024)
        assert np.array_equal(np.stack(offloaded.instances), np.stack(inline.instances))
        with pytest.raises(InvalidInput, match="500 given, at most 10 allowed"):
            await decoder.run(body, decode_predict, SPEC, 10)
    finally:
        decoder.close()


async def test_the_event_loop_serves_others_while_a_large_body_is_parsed() -> None:
    decoder = BodyDecoder(offload_bytes=1024, processes=1)
    finished: list[str] = []

    async def large() -> None:
        await decoder.run(big_body(500), pid_of_decoder, 1.0)
        finished.append("large")

    async def small() -> None:
        await asyncio.sleep(0.3)  # well after the large body's parse began
        await decoder.run(b"{}", pid_of_decoder)
        finished.append("small")

    try:
        await asyncio.gather(large(), small())
    finally:
        decoder.close()
    assert finished == ["small", "large"]


async def test_a_dead_parse_process_fails_its_request_and_is_replaced() -> None:
    decoder = BodyDecoder(offload_bytes=16, processes=1)
    body = big_body(10)
    try:
        with pytest.raises(InferenceError):
            await decoder.run(body, die)
        assert await decoder.run(body, pid_of_decoder) != os.getpid()
    finally:
        decoder.close()
    with pytest.raises(NotReady):
        await decoder.run(body, pid_of_decoder)
