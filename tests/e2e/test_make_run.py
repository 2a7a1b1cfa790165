"""`make run`'s program brings the whole world up, plays the day and syncs (short, plain mode)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def test_sandbox_run_brings_the_world_up_and_syncs():
    proc = subprocess.run(
        [sys.executable, "-m", "sandbox.run", "--duration", "12", "--no-live", "--port", "0", "--people", "6",
         "--pace", "0.2"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "Functions host   http://127.0.0.1:" in out
    assert "Zoom emulator    http://127.0.0.1:" in out
    assert "Graph emulator   https://127.0.0.1:" in out
    syncs = int(re.search(r"done: (\d+) syncs", out).group(1))
    assert syncs > 0
    # The live view's figures come from the app's own metrics (shared/telemetry.py).
    observed, written = map(int, re.findall(r"metrics: observed (\d+), written (\d+)", out)[-1])
    assert observed > 0 and written > 0
    assert "Traceback" not in proc.stderr
