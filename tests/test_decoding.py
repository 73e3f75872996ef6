"""Body decoding: the /predict decoder, and large bodies parsed in a separate process."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

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


# A server process with a parse in progress: it prints its parse process's PID, then stops
# its decoder (CLOSE) or waits to be killed.
_HOST = """
import asyncio, multiprocessing, sys, time
from gpuserve.core.offload import BodyDecoder

async def main():
    decoder = BodyDecoder(offload_bytes=1, processes=1)
    assert await decoder.run(-1, abs, size=2) == 1  # parsed in the parse process, now up
    (child,) = multiprocessing.active_children()
    print(child.pid, flush=True)
    parse = asyncio.ensure_future(decoder.run(60, time.sleep, size=2))  # a parse of a minute
    await asyncio.sleep(0.5)
    if sys.argv[1] == "close":
        decoder.close()
        print("closed", flush=True)
    else:
        await parse

asyncio.run(main())
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["close", "kill"])
def test_parse_processes_never_outlive_or_hold_their_server(how: str) -> None:
    """Closed with a parse in progress, the server exits at once; killed, its parse process
    goes with it: no orphan either way."""
    import signal
    import subprocess
    import sys

    host = subprocess.Popen([sys.executable, "-c", _HOST, how], stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None
        parse_pid = int(host.stdout.readline())
        assert alive(parse_pid)
        if how == "close":
            assert host.stdout.readline().strip() == "closed"
            assert host.wait(timeout=20) == 0  # not the minute the parse would take
        else:
            time.sleep(0.5)
            host.send_signal(signal.SIGKILL)
            host.wait(timeout=20)
        assert wait_gone(parse_pid, 10), f"parse process {parse_pid} outlived its server"
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        if host.stdout is not None:
            host.stdout.close()
