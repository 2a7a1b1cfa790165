"""The deployment package: the files `func azure functionapp publish` would upload.

Core Tools walks the project folder and drops every path .funcignore matches (gitignore syntax;
`func azure functionapp publish --list-included-files` prints the result). This builds the same
list from the working tree, so it also sees what a developer's checkout really holds: .venv,
node_modules, caches, Azurite files, local.settings.json.
"""

from __future__ import annotations

import os
from pathlib import Path

import pathspec
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]

# Top-level entries the package may contain: the app and nothing else.
PACKAGE_TOP_LEVEL = {"function_app.py", "host.json", "requirements.txt", ".funcignore", "functions", "shared"}
REQUIRED = {"function_app.py", "host.json", "requirements.txt"}
# Dev-only packages that must never be runtime dependencies (besides all of requirements-dev.txt).
KNOWN_DEV_ONLY = {"pytest", "pytest-xdist", "pytest-timeout", "ruff", "hypothesis", "trustme", "werkzeug",
                  "croniter", "rich", "pycep-parser", "checkov", "pathspec", "coverage", "mypy"}


def package_files(root: Path, funcignore: Path) -> set[str]:
    spec = pathspec.GitIgnoreSpec.from_lines(funcignore.read_text().splitlines())
    files: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath).relative_to(root).as_posix()

        def rel(name: str, here: str = here) -> str:
            return name if here == "." else f"{here}/{name}"

        # Pruning ignored folders is what keeps .venv and node_modules out (and the walk fast).
        dirnames[:] = [d for d in dirnames if not spec.match_file(rel(d) + "/")]
        files.update(rel(f) for f in filenames if not spec.match_file(rel(f)))
    return files


def package_problems(files: set[str], root: Path) -> list[str]:
    problems = [f"missing from the package: {name}" for name in sorted(REQUIRED - files)]
    for folder in ("functions", "shared"):
        for source in sorted((root / folder).rglob("*.py")):
            name = source.relative_to(root).as_posix()
            if "__pycache__" not in name and name not in files:
                problems.append(f"missing from the package: {name}")
    problems += [f"not app code, add it to .funcignore: {name}" for name in sorted(files)
                 if name.split("/", 1)[0] not in PACKAGE_TOP_LEVEL or name.endswith(".pyc")]
    return problems


def _names(lines: list[str]) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(canonicalize_name(Requirement(line).name))
    return names


def dev_only_in_runtime(runtime: list[str], dev: list[str]) -> set[str]:
    dev_only = (_names(dev) - _names(runtime)) | {canonicalize_name(n) for n in KNOWN_DEV_ONLY}
    return _names(runtime) & dev_only


def test_package_holds_the_app_and_nothing_else():
    files = package_files(ROOT, ROOT / ".funcignore")
    assert package_problems(files, ROOT) == []
    assert "function_app.py" in files and "host.json" in files  # host.json at the root, not nested


def test_dev_code_stays_out_of_the_package():
    files = package_files(ROOT, ROOT / ".funcignore")
    for folder in ("tests", "sandbox", "bench", "infra", "docs", "node_modules", ".venv", ".ci"):
        assert not any(f == folder or f.startswith(folder + "/") for f in files), folder
    for name in ("Makefile", "pyproject.toml", "requirements-dev.txt", "package.json", "azure.yaml",
                 "local.settings.json", "local.settings.example.json", "README.md"):
        assert name not in files


def test_package_check_reports_what_a_thin_funcignore_lets_through(tmp_path):
    for name in ("function_app.py", "host.json", "requirements.txt", "functions/a.py", "shared/b.py",
                 "tests/test_a.py", "shared/__pycache__/b.cpython-311.pyc", "local.settings.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / ".funcignore").write_text("__pycache__\n")
    problems = package_problems(package_files(tmp_path, tmp_path / ".funcignore"), tmp_path)
    assert problems == ["not app code, add it to .funcignore: local.settings.json",
                        "not app code, add it to .funcignore: tests/test_a.py"]
    (tmp_path / ".funcignore").write_text((ROOT / ".funcignore").read_text())
    assert package_problems(package_files(tmp_path, tmp_path / ".funcignore"), tmp_path) == []


def test_runtime_requirements_are_pinned_and_free_of_dev_packages():
    runtime = (ROOT / "requirements.txt").read_text().splitlines()
    dev = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert dev_only_in_runtime(runtime, dev) == set()
    for line in runtime:
        line = line.split("#", 1)[0].strip()
        if line:
            assert "==" in line, f"runtime dependency not pinned: {line}"


def test_requirements_check_reports_a_dev_package():
    assert dev_only_in_runtime(["requests==2.0", "pytest==9.0"], ["-r requirements.txt", "ruff==1"]) == {"pytest"}
    assert dev_only_in_runtime(["Werkzeug==3.1.9"], []) == {"werkzeug"}
