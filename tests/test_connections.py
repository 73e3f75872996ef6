"""Connection limits: the cap against the open-file limit, and raising that limit.

The limits at work on a real socket (silent and half-sent connections closed, connections past
the cap refused with a JSON 503) are in tests/test_socket.py.
"""

from __future__ import annotations

import logging
import resource

import pytest

from gpuserve.app.connections import connection_cap, raise_fd_limit


def test_the_cap_is_the_setting_when_the_open_file_limit_has_room() -> None:
    assert connection_cap(2048, 20000) == 2048


def test_the_cap_is_lowered_with_a_warning_to_what_the_open_file_limit_allows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="gpuserve.connections"):
        assert connection_cap(2048, 1024) == 1024 - 128
    assert "capping at 896" in caplog.text


def test_the_soft_open_file_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and hard > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        raised = raise_fd_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised
        assert hard == resource.RLIM_INFINITY or raised == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
