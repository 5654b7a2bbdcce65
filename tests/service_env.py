"""The environment variables each service reads, from the services' own --help (each flag's help ends
with "[NAME]"): what deployment files (compose, Kubernetes) are checked against."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

from tests.helpers import ROOT


@functools.cache
def env_names(module: str) -> frozenset[str]:
    """The environment variables a service reads, from its own --help ("[NAME]" after each flag)."""
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "250"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    names = frozenset(re.findall(r"\[([A-Z][A-Z0-9_]*)(?:=1)?\]", result.stdout))
    assert "CHECKPOINT_PATH" in names, result.stdout
    return names
