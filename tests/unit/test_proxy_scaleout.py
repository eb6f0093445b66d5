"""What a replica runs with, the URL a server registers under, and the serve settings of scale-out
(no processes)."""

from __future__ import annotations

import pytest

from servekit.cli import build_parser
from servekit.proxy.registration import advertised_url
from servekit.proxy.replicas import replica_flags
from servekit.specs.llm.config import ServeConfig, ServeConfigError


def test_replicas_get_the_parents_flags_as_given_but_not_its_address_or_key() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "./model",
            "--replicas",
            "3",
            "--port",
            "9000",
            "--host",
            "0.0.0.0",
            "--api-key",
            "secret",
            "--max-model-len",
            "2k",
            "--no-enable-prefix-caching",
            "--workers",
            "2",
        ]
    )
    flags = replica_flags(vars(args))
    assert flags[0] == "./model"
    assert flags[1:] == ["--max-model-len", "2k", "--no-enable-prefix-caching", "--workers", "2"]


def test_advertised_url_replaces_wildcards() -> None:
    assert advertised_url("127.0.0.1", 8001) == "http://127.0.0.1:8001"
    assert advertised_url("::1", 8001) == "http://[::1]:8001"
    assert not advertised_url("0.0.0.0", 8001).startswith("http://0.0.0.0")


def test_serve_settings_of_scale_out() -> None:
    config = ServeConfig.resolve({}, {"SERVEKIT_REPLICAS": "2", "SERVEKIT_PROXY_API_KEY": "k"})
    assert config.replicas == 2 and config.proxy_api_key == "k"
    assert config.redacted()["proxy_api_key"] == "***"
    with pytest.raises(ServeConfigError, match="replicas must be at least 1"):
        ServeConfig.resolve({"replicas": "0"}, {})
    with pytest.raises(ServeConfigError, match="cannot be combined"):
        ServeConfig.resolve({"replicas": "2", "proxy_url": "http://p:8000"}, {})
    with pytest.raises(ServeConfigError, match="SERVEKIT_PROXY_URL"):
        ServeConfig.resolve({}, {"SERVEKIT_PROXY_URL": "127.0.0.1:8000"})
