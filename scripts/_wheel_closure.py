"""The packages gpuserve needs on the GPU machine beyond that machine's own: gpuserve's
requirements and theirs, recursively, with extras and markers as Python 3.12 on x86-64 Linux
reads them, at the versions installed here, less the packages that machine has (the device
tool's KINDS.md lists them). Prints `name==version` lines for `scripts/gpu_wheels.sh`.

protobuf and typing-extensions are not taken from that machine: tritonclient's generated code
and pydantic need recent ones. (A hand-kept list missed fastapi's opentelemetry-api, and the
served check's server could not start there.)
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ON_DEVICE = frozenset(
    {
        "torch", "numpy", "safetensors", "nvidia-ml-py", "prometheus-client", "httpx",
        "httpcore", "h11", "anyio", "idna", "certifi", "sniffio", "uvloop", "grpcio", "click",
        "packaging", "ml-dtypes", "urllib3", "pyyaml", "psutil", "filelock", "jinja2",
        "markupsafe", "fsspec", "networkx", "sympy", "mpmath", "setuptools", "zipp",
    }
)  # fmt: skip
DEVICE_MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def closure(root: str = "gpuserve", have: frozenset[str] = ON_DEVICE) -> dict[str, str]:
    """Every distribution `root` needs there and `have` lacks: name to the version here."""
    wanted: dict[str, set[str]] = {}  # name: the extras asked of it
    todo = [Requirement(root)]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        extras = set(requirement.extras)
        if name in have or (name in wanted and extras <= wanted[name]):
            continue
        wanted[name] = wanted.get(name, set()) | extras
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for line in requires:
            needed = Requirement(line)
            if needed.marker is None or any(
                needed.marker.evaluate({**DEVICE_MARKERS, "extra": extra})
                for extra in {"", *wanted[name]}
            ):
                todo.append(needed)
    wanted.pop(canonicalize_name(root))
    versions = {}
    for name in sorted(wanted):
        # One not installed here is a requirement of another platform.
        with contextlib.suppress(md.PackageNotFoundError):
            versions[name] = md.version(name)
    return versions


if __name__ == "__main__":
    for name, version in closure().items():
        print(f"{name}=={version}")
