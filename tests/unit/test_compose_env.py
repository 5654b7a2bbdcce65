"""docker-compose.yml hands every setting a service reads through from the shell or .env (unset or empty =
the service's default), except what compose fixes inside its network; .env.example lists each of them."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.helpers import ROOT
from tests.service_env import env_names

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
ENV_EXAMPLE = (ROOT / ".env.example").read_text()
SERVICES = {"vision": "vision_service", "llm": "llm_service", "gateway": "gateway"}
# Fixed by compose: binds and addresses inside its network; the internal secret comes in a file.
FIXED = {"HOST", "PORT", "VISION_ADDR", "LLM_ADDR", "MMSERVE_INTERNAL_TOKEN"} | {
    f"{prefix}_{what}" for prefix in ("VISION", "LLM") for what in ("HOST", "PORT", "METRICS_PORT")
}


def passed_through(service: str) -> dict[str, str]:
    """The service's environment entries whose value comes from the caller's environment."""
    environment = COMPOSE["services"][service]["environment"]
    return {name: value for name, value in environment.items() if f"${{{name}" in str(value)}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_setting_of_the_service_passes_through(service):
    reads = env_names(SERVICES[service])
    missing = reads - FIXED - set(passed_through(service))
    assert not missing, f"{service}: settings the container cannot receive: {sorted(missing)}"


def test_env_example_lists_every_passed_through_setting():
    listed = set(re.findall(r"^# ([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE, re.M))
    passed = {name for service in SERVICES for name in passed_through(service)}
    assert passed <= listed, sorted(passed - listed)
    assert not listed & FIXED - {"PORT"}, "fixed settings are not the operator's to set"
