"""Dify's own plugin SDK (``dify-plugin``, Python 3.12) as a test client: the venv and the driver runner."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.process import REPO

DRIVER = Path(__file__).with_name("dify_driver.py")
VENV_SCRIPT = REPO / "scripts" / "dify_venv.sh"


@dataclass(frozen=True)
class Dify:
    """Runs one driver scenario in the 3.12 venv and returns its JSON result."""

    python: Path

    def run(self, scenario: str, base_url: str, model: str, *options: str) -> dict[str, Any]:
        cmd = [str(self.python), str(DRIVER), scenario, "--base-url", base_url, "--model", model, *options]
        env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
        lines = proc.stdout.strip().splitlines()
        assert lines, f"driver printed nothing (exit {proc.returncode}); stderr:\n{proc.stderr[-4000:]}"
        result: dict[str, Any] = json.loads(lines[-1])
        assert proc.returncode == (0 if result["ok"] else 1), proc.stderr[-4000:]
        return result

    def ok(self, scenario: str, base_url: str, model: str, *options: str) -> dict[str, Any]:
        result = self.run(scenario, base_url, model, *options)
        assert result["ok"], f"Dify's SDK raised {result.get('error_type')}: {result.get('error')}"
        assert result["sdk_version"] == "0.10.2"
        return result
