"""gpuserve: serve PyTorch models over HTTP with GPU awareness and dynamic batching."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gpuserve.version import __version__

__all__ = ["Settings", "__version__", "create_app", "serve"]

if TYPE_CHECKING:
    from gpuserve.api import serve
    from gpuserve.config import Settings
    from gpuserve.http import create_app


def __getattr__(name: str) -> Any:
    # Lazy, so `import gpuserve` (and `gpuserve --help`) does not pay for torch and FastAPI.
    if name == "create_app":
        from gpuserve.http import create_app

        return create_app
    if name == "serve":
        from gpuserve.api import serve

        return serve
    if name == "Settings":
        from gpuserve.config import Settings

        return Settings
    raise AttributeError(f"module 'gpuserve' has no attribute {name!r}")
