"""Acceptance: ``tracker demo`` runs end to end in a subprocess, well within a minute."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_and_explains_the_history():
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    r = subprocess.run([sys.executable, "-m", "tracker", "demo", "--runs", "8", "--agents", "2"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "learnt by callback" in r.stdout
    assert "by poll" in r.stdout
    assert "exactly once" in r.stdout
    assert "Per-agent order kept" in r.stdout
    assert r.stdout.count("run-") == 8
    assert "API key" not in r.stdout  # its throwaway database's first-start key is no use
    assert "Traceback" not in r.stderr
