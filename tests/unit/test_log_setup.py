"""pretty_logs is honoured with rich, and refused clearly without it."""

from __future__ import annotations

import sys

import pytest

from servekit.log_setup import LogSettings


def test_pretty_logs_without_rich_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rich.logging", None)  # as if rich were not installed
    with pytest.raises(RuntimeError, match="pip install rich"):
        LogSettings("info", pretty=True)


def test_plain_logs_do_not_need_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rich.logging", None)
    assert LogSettings("warning").pretty is False
