"""The sandbox's Azurite launcher: its queue housekeeping runs often enough not to stall storage."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sandbox.azurite import QUEUE_GC_PRELOAD, ROOT

ENTRY = ROOT / "node_modules" / "azurite" / "dist" / "src" / "azurite.js"


def _run_with_preload(tmp_path: Path, entry: Path) -> subprocess.CompletedProcess:
    # A second preload reports the interval the queue service will use once the first has run.
    probe = tmp_path / "probe.cjs"
    probe.write_text(
        'const path = require("path");\n'
        'try {\n'
        '  const c = require(path.join(path.dirname(require("fs").realpathSync(process.argv[1])),'
        ' "queue", "utils", "constants.js"));\n'
        '  process.stderr.write(`interval=${c.DEFAULT_GC_INTERVAL_MS}\\n`);\n'
        '} catch (e) { process.stderr.write("no azurite here\\n"); }\n')
    return subprocess.run(["node", "--require", str(QUEUE_GC_PRELOAD), "--require", str(probe), str(entry),
                           "--version"], capture_output=True, text=True, timeout=60, env=dict(os.environ), check=False)


@pytest.mark.skipif(not ENTRY.exists(), reason="azurite is not installed (npm ci)")
def test_the_queue_sweep_runs_every_second(tmp_path: Path) -> None:
    # Azurite's default is once a minute, and a minute of messages makes one sweep stop it for seconds.
    out = _run_with_preload(tmp_path, ENTRY)
    assert out.returncode == 0, out.stderr
    assert "interval=1000" in out.stderr
    assert "left at its default" not in out.stderr


def test_an_unknown_azurite_is_left_alone_with_a_warning(tmp_path: Path) -> None:
    script = tmp_path / "not-azurite.js"
    script.write_text("process.exit(0);\n")
    out = _run_with_preload(tmp_path, script)
    assert out.returncode == 0
    assert "queue GC interval left at its default" in out.stderr
