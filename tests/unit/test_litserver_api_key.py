"""LitServer's api_key: an argument, defaulting to LIT_SERVER_API_KEY read when the server is built."""

from __future__ import annotations

import os

import pytest

import servekit as ls
from servekit.examples import SimpleLitAPI


def test_the_argument_wins_and_the_environment_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIT_SERVER_API_KEY", raising=False)
    assert ls.LitServer(SimpleLitAPI(), accelerator="cpu").api_key is None
    assert ls.LitServer(SimpleLitAPI(), accelerator="cpu", api_key="arg").api_key == "arg"
    assert "LIT_SERVER_API_KEY" not in os.environ

    monkeypatch.setenv("LIT_SERVER_API_KEY", "env")
    assert ls.LitServer(SimpleLitAPI(), accelerator="cpu").api_key == "env"
    assert ls.LitServer(SimpleLitAPI(), accelerator="cpu", api_key="arg").api_key == "arg"
    server = ls.LitServer(SimpleLitAPI(), accelerator="cpu")
    monkeypatch.setenv("LIT_SERVER_API_KEY", "changed later")
    assert server.api_key == "env"  # read when the server was constructed
