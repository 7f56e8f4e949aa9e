"""docker-compose.yml must stay a valid deployment description."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_file_describes_kraft_kafka_and_points_services_at_it():
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    kafka = spec["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert kafka["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    for name, service in spec["services"].items():
        if service.get("image", "").startswith("agentrt"):
            assert service["environment"]["AGENTRT_BOOTSTRAP_SERVERS"] == "kafka:9092", name
    assert spec["services"]["policy-worker"]["command"][:3] == ["worker", "--policy", "cachesage"]
    vllm = spec["services"]["vllm"]
    assert "engine_emitter.scheduler.AgentRuntimeScheduler" in vllm["command"]
    assert (ROOT / vllm["build"]["dockerfile"]).exists()


@pytest.mark.skipif(not shutil.which("docker") or subprocess.run(["docker", "compose", "version"],
                    capture_output=True).returncode != 0, reason="no docker compose plugin on this machine")
def test_docker_compose_config_parses():
    result = subprocess.run(["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
