"""checkov's Bicep policies over infra/: no failed check, and every skip is justified inline.

checkov pins packages that conflict with the test suite's (packaging<24 against pytest 9), so
`make deps` installs it into its own environment (.venv/tools/checkov, pinned by
infra/requirements-checkov.txt); CHECKOV may point at another checkov executable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.infra import bicep_model as bm

SKIP = re.compile(r"//\s*checkov:skip=(?P<id>CKV2?_[A-Z0-9_]+)(?::(?P<reason>.*))?$", re.M)

# The only file checkov may fail to parse: its bundled Bicep grammar predates the `extension`
# keyword the Microsoft Graph resources need (the other infra tests parse it with pycep-parser).
UNPARSED_BY_CHECKOV = {"modules/entra-app.bicep"}


def _checkov() -> str:
    candidates = [os.environ.get("CHECKOV"), str(bm.ROOT / ".venv" / "tools" / "checkov" / "bin" / "checkov"),
                  shutil.which("checkov")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("checkov is not installed: run `make deps` (it installs infra/requirements-checkov.txt "
                "into .venv/tools/checkov) or set CHECKOV")


def _inline_skips() -> dict[tuple[str, str], str]:
    skips = {}
    for path in bm.bicep_files():
        for match in SKIP.finditer(path.read_text()):
            skips[(path.relative_to(bm.INFRA).as_posix(), match["id"])] = (match["reason"] or "").strip()
    return skips


def test_every_inline_skip_gives_a_reason():
    skips = _inline_skips()
    assert skips, "expected the documented skips"
    for (path, check), reason in skips.items():
        assert len(reason) >= 20, f"{path}: skip of {check} needs a reason"


def test_checkov_passes_with_only_justified_skips():
    # Offline: --skip-download (no Prisma Cloud guidelines), no PyPI update check. One run serves
    # every assertion below.
    result = subprocess.run(
        [_checkov(), "--framework", "bicep", "--directory", str(bm.INFRA), "--output", "json",
         "--compact", "--skip-download"],
        cwd=bm.ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true"},
    )
    assert result.returncode in (0, 1), result.stderr[-2000:]
    report = json.loads(result.stdout)
    report = next(r for r in (report if isinstance(report, list) else [report]) if r["check_type"] == "bicep")
    results = report["results"]

    failed = [f"{r['check_id']} {r['file_path']} {r['resource']}: {r['check_name']}" for r in results["failed_checks"]]
    assert not failed, "checkov failures:\n" + "\n".join(failed)

    unparsed = {Path(p).resolve().relative_to(bm.INFRA).as_posix() for p in results["parsing_errors"]}
    assert unparsed == UNPARSED_BY_CHECKOV

    assert report["summary"]["passed"] >= 30, "checkov evaluated too little: did a file stop parsing?"

    skipped = {(r["file_path"].lstrip("/"), r["check_id"]) for r in results["skipped_checks"]}
    inline = _inline_skips()
    assert skipped == set(inline), (f"skips checkov did not need: {sorted(set(inline) - skipped)}; "
                                    f"skips without an inline comment: {sorted(skipped - set(inline))}")
