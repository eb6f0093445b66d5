"""One size parser for every size setting: KB = 1000, KiB = 1024, and a clear error for the rest."""

from __future__ import annotations

import pytest

from servekit.sizes import parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        ("100B", 100),
        ("64KB", 64_000),
        ("64kb", 64_000),
        ("64KiB", 65_536),
        ("512MB", 512_000_000),
        ("512MiB", 512 << 20),
        ("512M", 512_000_000),
        ("2GB", 2_000_000_000),
        ("2GiB", 2 << 30),
        ("1.5GiB", 3 << 29),
        ("1TiB", 1 << 40),
        (" 8 KiB ", 8192),
        (4096, 4096),
        (50e6, 50_000_000),  # LitServer(api, max_payload_size=50e6), as LitServe users write it
    ],
)
def test_sizes(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "garbage",
    ["", "lots", "2XB", "-1KB", "1.2.3MB", "KB", "1 KiBB", -5, True, 1.5, -1e3, float("inf"), float("nan")],
)
def test_garbage_is_refused_naming_the_accepted_forms(garbage: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(garbage)  # type: ignore[arg-type]


def test_every_size_setting_uses_it() -> None:
    import servekit as ls
    from servekit.examples import SimpleLitAPI
    from servekit.llm import EngineConfig, EngineConfigError

    def payload_limit(size: str | float) -> int | None:
        return ls.LitServer(SimpleLitAPI(), accelerator="cpu", max_payload_size=size).max_payload_size

    assert (payload_limit("64KB"), payload_limit("64KiB")) == (64_000, 65_536)
    assert payload_limit(50e6) == 50_000_000
    with pytest.raises(ValueError, match="not a size"):
        payload_limit("big")
    assert EngineConfig(kv_cache_memory="512KB").kv_cache_memory == 512_000
    assert EngineConfig(kv_cache_memory="512KiB").kv_cache_memory == 512 << 10
    with pytest.raises(EngineConfigError, match="kv_cache_memory") as error:
        EngineConfig(kv_cache_memory="huge")
    assert error.value.name == "kv_cache_memory"
