import os
import re

import pytest

from servekit.request_id import RequestIds, check_request_id, new_request_id


def test_request_ids_are_128_bit_hex_and_unique() -> None:
    ids = RequestIds()
    made = [ids.new() for _ in range(20000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", value) for value in made)
    assert len(set(made)) == len(made)
    assert all(check_request_id(value) is None for value in made[:100])
    # the leading digits vary too: the ids are zero-padded 128-bit numbers, not shorter ones
    assert len({value[0] for value in made}) == 16


def test_two_generators_do_not_repeat_each_other() -> None:
    first, second = RequestIds(), RequestIds()
    assert {first.new() for _ in range(1000)}.isdisjoint(second.new() for _ in range(1000))


def test_a_generator_makes_no_syscall_per_id(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = RequestIds()
    calls = []

    def urandom(n: int) -> bytes:
        calls.append(n)
        return b"\0" * n

    monkeypatch.setattr(os, "urandom", urandom)
    ids.new()
    assert calls == []
    assert len(new_request_id()) == 32 and calls == [16]
