"""500 bodies: an unexpected exception is "Internal server error" unless debugging is on."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.exceptions import HTTPException

import servekit as ls
from servekit.workers.loops import error_of


class EchoAPI(ls.LitAPI):
    def predict(self, x: Any) -> Any:
        return x


def test_unexpected_exceptions_are_hidden_unless_debugging() -> None:
    error = KeyError("secret-token")
    assert error_of(error) == (500, "Internal server error")
    assert error_of(error, show_details=True) == (500, "KeyError: 'secret-token'")
    # Errors raised on purpose keep their status and detail either way.
    assert error_of(HTTPException(418, "teapot")) == (418, "teapot")
    assert error_of(ls.ServerError(500, "said on purpose")) == (500, "said on purpose")


def test_the_switch_is_a_litserver_argument_or_the_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERVEKIT_DEBUG_ERRORS", raising=False)
    assert ls.LitServer(EchoAPI(), accelerator="cpu").lit_apis[0]._debug_errors is False
    assert ls.LitServer(EchoAPI(), accelerator="cpu", debug_errors=True).lit_apis[0]._debug_errors is True
    monkeypatch.setenv("SERVEKIT_DEBUG_ERRORS", "1")
    assert ls.LitServer(EchoAPI(), accelerator="cpu").lit_apis[0]._debug_errors is True
    assert ls.LitServer(EchoAPI(), accelerator="cpu", debug_errors=False).lit_apis[0]._debug_errors is False
