"""The Kubernetes manifests: valid against the API schemas (kubernetes-validate --strict), and
consistent with the server they run (probes, drain time, GPU request, autoscaling signal)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from gpuserve.config import Settings

from .helpers import ROOT

MANIFESTS = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))


def manifest(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "k8s" / name).read_text())
    return document


def test_every_manifest_validates_strictly(tmp_path: Path) -> None:
    assert len(MANIFESTS) >= 4
    validate = Path(sys.executable).with_name("kubernetes-validate")
    result = subprocess.run(
        [str(validate), "--strict", *map(str, MANIFESTS)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The check itself can fail: an unknown field is refused.
    typo = tmp_path / "typo.yaml"
    typo.write_text((ROOT / "deploy/k8s/service.yaml").read_text().replace("port:", "prot:", 1))
    refused = subprocess.run([str(validate), "--strict", str(typo)], capture_output=True)
    assert refused.returncode != 0


def test_the_pod_drains_before_it_is_killed() -> None:
    pod = manifest("deployment.yaml")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    drain_s = float(env["GPUSERVE_SHUTDOWN_TIMEOUT_S"])
    pause_s = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pause_s + drain_s
    assert drain_s == Settings().shutdown_timeout_s
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env["GPUSERVE_HOST"] == "0.0.0.0"


def test_autoscaling_follows_requests_in_flight_not_cpu() -> None:
    (metric,) = manifest("hpa.yaml")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "gpuserve_requests_in_flight"
    rules = manifest("prometheus-adapter-rule.yaml")["data"]["config.yaml"]
    assert "gpuserve_requests_in_flight" in rules
