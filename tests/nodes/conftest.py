"""Fixtures of the node tests: free loopback endpoints."""

from __future__ import annotations

import socket

import pytest


def free_port() -> int:
    """A tcp port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_tcp_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"
