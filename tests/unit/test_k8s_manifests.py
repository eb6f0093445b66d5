"""deploy/k8s parses and fits together: probes on /health, ports, the proxy's Service in --proxy-url,
resources, and only env names servekit reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from servekit.llm.config import EngineConfig
from servekit.proxy.config import ProxyConfig
from servekit.settings import settings_of
from servekit.specs.llm.config import ServeConfig

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in documents() if doc["kind"] == kind}


def env_names(*classes: type) -> set[str]:
    return {name for cls in classes for s in settings_of(cls) for name in s.env_names}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(only)


def test_manifests_parse_into_deployments_and_services() -> None:
    assert {doc["kind"] for doc in documents()} == {"Deployment", "Service"}
    deployments, services = by_kind("Deployment"), by_kind("Service")
    assert set(deployments) == {"servekit-proxy", "servekit-serve"}
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
    proxy_service = services["servekit-proxy"]
    assert (
        proxy_service["spec"]["selector"] == deployments["servekit-proxy"]["spec"]["selector"]["matchLabels"]
    )


def test_probes_ports_and_resources() -> None:
    for name, deployment in by_kind("Deployment").items():
        spec = container(deployment)
        ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
        assert spec["args"][spec["args"].index("--port") + 1] == str(ports["http"]), name
        assert spec["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}, name
        assert "livenessProbe" in spec, name
        for key in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(spec["resources"][key]), name
    serve = container(by_kind("Deployment")["servekit-serve"])
    assert serve["livenessProbe"]["httpGet"]["path"] == "/health"
    assert serve["startupProbe"]["httpGet"]["path"] == "/health"


def test_serve_pods_register_with_the_proxy_service() -> None:
    serve = container(by_kind("Deployment")["servekit-serve"])
    args = serve["args"]
    service = by_kind("Service")["servekit-proxy"]
    port = service["spec"]["ports"][0]["port"]
    assert args[args.index("--proxy-url") + 1] == f"http://{service['metadata']['name']}:{port}"
    assert "$(POD_IP)" in args[args.index("--advertise-url") + 1]
    assert any(e["name"] == "POD_IP" for e in serve["env"])


def test_env_names_are_settings() -> None:
    known = {
        "servekit-serve": env_names(EngineConfig, ServeConfig) | {"POD_IP"},
        "servekit-proxy": env_names(ProxyConfig),
    }
    for name, deployment in by_kind("Deployment").items():
        for env in container(deployment).get("env", []):
            assert env["name"] in known[name], (name, env["name"])
    proxy = container(by_kind("Deployment")["servekit-proxy"])
    strategy = next(e["value"] for e in proxy["env"] if e["name"] == "SERVEKIT_PROXY_ROUTING_STRATEGY")
    assert ProxyConfig.resolve({}, {"SERVEKIT_PROXY_ROUTING_STRATEGY": strategy}).routing_strategy == strategy
