"""``bench/engine.py --smoke --only inhouse`` runs from a fresh checkout (issue 9, defect 4).

Keys are the server's default, so a contender started without ``--auth none`` (or a key) fails its warm-up
with ``401 no API key`` and the benchmark measures only the peers; the run must answer, and say how inhouse ran.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.process import REPO

pytestmark = pytest.mark.slow  # loads the real SmolLM2 (under a minute on 2 cores)


def test_smoke_run_measures_inhouse_and_says_it_runs_without_keys(tmp_path: Path, cache_dir: Path) -> None:
    out = tmp_path / "engine.json"
    proc = subprocess.run([sys.executable, "bench/engine.py", "--smoke", "--only", "inhouse", "--cache-dir",
                           str(cache_dir), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["meta"]["smoke"] is True and "--auth none" in report["meta"]["auth"]
    assert "--auth none" in proc.stdout  # said in the output too
    inhouse = report["contenders"]["inhouse"]
    assert inhouse["error"] is None and set(report["contenders"]) == {"inhouse"}
    level = inhouse["levels"]["1"]
    assert level["errors"] == [] and level["output_tokens"] > 0 and level["tokens_from"] == "usage"
