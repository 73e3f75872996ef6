"""The README's "Your own model in five minutes", played as a new user would: its own code
blocks, run as written, then each mistake its table lists, with the message it promises.

If the README changes, this follows it: the code comes from the README, not from here.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from .helpers import ROOT, ServerProcess, wait_ready

README = (ROOT / "README.md").read_text()
GPUSERVE = [sys.executable, "-m", "gpuserve"]


def block(marker: str) -> str:
    """The fenced code block after `<!-- quickstart: marker -->` in the README."""
    found = re.search(rf"<!-- quickstart: {re.escape(marker)} -->\n```\w*\n(.*?)```", README, re.S)
    assert found is not None, f"the README has no quickstart block {marker!r}"
    return found.group(1)


def commands(marker: str) -> list[str]:
    """The shell commands of a block, continuation lines joined, comments left out."""
    text = block(marker).replace("\\\n", " ")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def gpuserve_argv(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[0] == "gpuserve"
    return [*GPUSERVE, *words[1:]]


def run(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**_environ(), **env},
    )


def _environ() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("GPUSERVE_")}


def serve(cwd: Path, *args: str) -> ServerProcess:
    argv = gpuserve_argv(commands("serve")[0])
    return ServerProcess(*args, command=[*argv, "--port", "0"], cwd=cwd, env=_environ())


def curl(server: ServerProcess, command: str) -> httpx.Response:
    """A README curl command, sent to the test's server."""
    words = shlex.split(command)
    url = next(word for word in words if word.startswith("localhost:"))
    body = words[words.index("-d") + 1]
    path = "/" + url.split("/", 1)[1]
    return httpx.post(
        f"{server.url}{path}", content=body, headers={"content-type": "application/json"}
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's own folder with the README's export run in it."""
    folder = tmp_path_factory.mktemp("newuser")
    (folder / "export.py").write_text(block("export.py"))
    result = run([sys.executable, "export.py"], folder)
    assert result.returncode == 0, result.stderr
    assert (folder / "mymodel.pt2").is_file()
    return folder


def module_of(path: Path) -> Any:
    return torch.export.load(str(path)).module()


def test_the_exported_file_is_served_and_answers_as_the_readme_says(workdir: Path) -> None:
    predict, infer = commands("call")[0], commands("call")[1]
    printed = json.loads(block("call").splitlines()[1].removeprefix("# "))
    with serve(workdir) as server:
        wait_ready(server.url)
        answer = curl(server, predict)
        assert answer.status_code == 200, answer.text
        # What the README prints, to float32's last digits: the CPU's matrix kernels sum in
        # an order that depends on the machine (one CPU gave 0.0738385 where the README's
        # printed 0.07383847), so the digits are compared as floats, as against torch below.
        assert answer.json()["model"] == printed["model"]
        np.testing.assert_allclose(answer.json()["outputs"], printed["outputs"], rtol=1e-6)
        x = torch.arange(10, dtype=torch.float32)[None]
        expected = module_of(workdir / "mymodel.pt2")(x).detach().numpy()[0]
        np.testing.assert_allclose(answer.json()["outputs"], expected, rtol=1e-6)
        v2 = curl(server, infer)
        assert v2.status_code == 200, v2.text
        np.testing.assert_allclose(v2.json()["outputs"][0]["data"], expected, rtol=1e-6)
        wrong = httpx.post(f"{server.url}/predict", json={"inputs": [1, 2, 3]})
        assert wrong.status_code == 422
        assert wrong.json()["error"] == "inputs: expected float32[10], got shape [3]"
        assert server.stop() == 0


def test_init_then_labels_give_a_classifier(workdir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "classifier"
    folder.mkdir()
    (folder / "mymodel.pt2").write_bytes((workdir / "mymodel.pt2").read_bytes())
    result = run([*GPUSERVE, "init", "mymodel.pt2"], folder)
    assert result.returncode == 0, result.stderr
    assert "gpuserve serve --config gpuserve.toml" in result.stdout
    spec = json.loads((folder / "mymodel.json").read_text())
    spec["labels"] = ["cat", "dog", "eel"]  # step 5, as the README says
    (folder / "mymodel.json").write_text(json.dumps(spec))
    with ServerProcess(
        "--config", "gpuserve.toml", "--port", "0", command=[*GPUSERVE, "serve"], cwd=folder
    ) as server:
        wait_ready(server.url)
        answer = httpx.post(f"{server.url}/predict", json={"inputs": list(range(10))}).json()
        x = torch.arange(10, dtype=torch.float32)[None]
        probabilities = torch.softmax(module_of(folder / "mymodel.pt2")(x), -1)[0].detach()
        assert answer["outputs"]["label"] == ["cat", "dog", "eel"][int(probabilities.argmax())]
        np.testing.assert_allclose(answer["outputs"]["probabilities"], probabilities, rtol=1e-6)


def test_the_python_api_example_serves(tmp_path: Path) -> None:
    (tmp_path / "serve.py").write_text(block("serve.py"))
    with ServerProcess(
        command=[sys.executable, "serve.py"], cwd=tmp_path, env={**_environ(), "GPUSERVE_PORT": "0"}
    ) as server:
        wait_ready(server.url)
        answer = httpx.post(f"{server.url}/predict", json={"inputs": list(range(10))})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "mymodel"
        assert answer.json()["outputs"]["label"] in ("cat", "dog", "eel")
        info = httpx.get(f"{server.url}/models/mymodel").json()
        assert info["batching"]["max_batch_size"] == 64
        assert server.stop() == 0


def test_a_fixed_batch_export_is_refused_with_the_export_that_fixes_it(tmp_path: Path) -> None:
    fixed = block("export.py").replace(", dynamic_shapes=({0: batch},)", "")
    assert fixed != block("export.py")
    (tmp_path / "export.py").write_text(fixed)
    assert run([sys.executable, "export.py"], tmp_path).returncode == 0
    result = run([*gpuserve_argv(commands("serve")[0]), "--port", "0"], tmp_path)
    assert result.returncode == 1
    assert "mymodel.pt2 was exported with a fixed batch size of 2" in result.stderr
    suggested = 'dynamic_shapes=({0: torch.export.Dim("batch")},))'
    assert f"torch.export.export(model, (torch.randn(2, 10),), {suggested}" in result.stderr
    # No advice that fails when followed: exported at 2, one at a time would not load either.
    assert "max_batch_size = 1" not in result.stderr
    assert "Traceback" not in result.stderr  # a user's mistake: one line, not a stack


def test_a_missing_file_and_a_bad_setting_say_what_and_where(tmp_path: Path) -> None:
    missing = run([*GPUSERVE, "serve", "nope.pt2", "--port", "0"], tmp_path)
    assert missing.returncode == 1
    assert f"model file not found: nope.pt2 (looked for {tmp_path / 'nope.pt2'}" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = run([*GPUSERVE, "serve", "mymodel.pt2", "--port", "70000"], tmp_path)
    assert bad.returncode == 1
    assert "port (flag --port): Input should be less than or equal to 65535" in bad.stderr


def test_labels_on_a_model_that_ends_in_softmax_are_warned_about(tmp_path: Path) -> None:
    softmaxed = block("export.py").replace(
        "torch.nn.Linear(32, 3))", "torch.nn.Linear(32, 3), torch.nn.Softmax(dim=-1))"
    )
    assert softmaxed != block("export.py")
    (tmp_path / "export.py").write_text(softmaxed)
    assert run([sys.executable, "export.py"], tmp_path).returncode == 0
    spec = {"input": {"shape": [10]}, "output": {"shape": [3]}, "labels": ["cat", "dog", "eel"]}
    (tmp_path / "mymodel.json").write_text(json.dumps(spec))  # no "name": it is optional
    with serve(tmp_path) as server:
        wait_ready(server.url)
        assert any("softmax twice" in line for line in server.log)
        assert any('set output.kind = "probabilities"' in line for line in server.log)


# What `make serve` installs is the project's core dependencies, without the test tools; a
# module the server imports from anything else works in the test venv and breaks a user's
# first `gpuserve serve` (tritonclient.grpc's import of `packaging` did). This imports the
# serving modules in a process where only the core dependencies' closure can be imported.
SERVING_CLOSURE = r"""
import importlib.abc, importlib.metadata as md, json, re, sys

allowed = set(json.loads(sys.argv[1]))
owners = md.packages_distributions()

class OnlyTheServingInstall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top not in owners or top == "gpuserve":
            return None
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in owners[top]}
        if dists & allowed:
            return None
        raise ModuleNotFoundError(f"{name} (from {sorted(dists)}) is not in the serving install")

sys.meta_path.insert(0, OnlyTheServingInstall())
import gpuserve.cli, gpuserve.http, gpuserve.grpc.server, gpuserve.handler, gpuserve.model.loading
import gpuserve.api, gpuserve.model.starter, gpuserve.protocols.predict
print("ok")
"""


def core_closure() -> set[str]:
    """The distributions `pip install gpuserve` brings, read from pyproject.toml (not from
    the installed metadata, which is as old as the last install), without any extra."""
    import importlib.metadata as md
    import tomllib

    from packaging.requirements import Requirement

    def key(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    seen: set[str] = {"gpuserve"}
    todo = [Requirement(text) for text in project["dependencies"]]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = key(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        with contextlib.suppress(md.PackageNotFoundError):  # not installed: nothing to follow
            todo += [Requirement(text) for text in md.requires(name) or []]
    return seen


def test_the_server_imports_nothing_the_serving_install_lacks() -> None:
    allowed = json.dumps(sorted(core_closure()))
    result = subprocess.run(
        [sys.executable, "-c", SERVING_CLOSURE, allowed],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
