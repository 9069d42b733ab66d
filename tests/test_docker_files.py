"""No docker engine here: check the production files statically."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from sidecar.config import Settings, env_name

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def test_compose_runs_tf_serving_next_to_the_sidecar():
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = doc["services"]
    assert {"tfserving", "sidecar"} <= set(services)  # + redis, envoy: tests/test_deployment_files.py
    tfs = services["tfserving"]
    assert tfs["image"].startswith("tensorflow/serving")
    assert "8500" in [str(p) for p in tfs["expose"]]
    assert any(v.split(":")[1] == "/models" for v in tfs["volumes"])
    assert "MODEL_NAME" in tfs["environment"]
    side = services["sidecar"]
    assert "tfserving" in side["depends_on"]
    assert side["environment"]["HASHGUARD_BACKEND"] == "tfserving:8500"
    assert "8600" in [str(p) for p in side["expose"]]  # published by Envoy in front of the replicas
    assert (DOCKER.parent / side["build"]["dockerfile"]).resolve().exists() or (DOCKER / Path(side["build"]["dockerfile"]).name).exists()
    # every HASHGUARD_ variable the compose file sets is a real setting
    known = {env_name(f) for f in Settings.__dataclass_fields__}
    assert set(k for k in side["environment"] if k.startswith("HASHGUARD_")) <= known


def test_dockerfiles_are_well_formed():
    for name in ("Dockerfile.sidecar", "Dockerfile.serving"):
        text = (DOCKER / name).read_text()
        instructions = [ln.split()[0] for ln in text.splitlines() if ln.strip() and not ln.startswith("#") and not ln.startswith(" ")]
        assert instructions[0] == "FROM"
        assert "USER" in instructions and "ENTRYPOINT" in instructions
        for src in re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M):
            assert (DOCKER.parent / src).exists(), f"{name} copies missing {src}"
    assert "hashguard-sidecar" in (DOCKER / "Dockerfile.sidecar").read_text()
