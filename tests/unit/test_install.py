"""scripts/install: pip runs only when pyproject.toml or what is asked for changed, so
`scripts/up` starts without network after the first run. Run in a copy of the checkout whose
virtualenv has a pip that only records how it was called."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.parts import REPO

RECORDING_PIP = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/../pip-calls"
touch "$(dirname "$0")/regcache" && chmod +x "$(dirname "$0")/regcache"
"""


@pytest.fixture
def checkout(tmp_path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "install", tmp_path / "scripts" / "install")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "tests").mkdir()
    shutil.copy(REPO / "tests" / "requirements.txt", tmp_path / "tests" / "requirements.txt")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / ".venv")], check=True, timeout=60)
    pip = tmp_path / ".venv" / "bin" / "pip"
    pip.write_text(RECORDING_PIP)
    pip.chmod(0o755)
    return tmp_path


def install(checkout: Path, *args: str) -> list[str]:
    """Run scripts/install; return the pip calls it made."""
    calls = checkout / ".venv" / "pip-calls"
    calls.unlink(missing_ok=True)
    subprocess.run([str(checkout / "scripts" / "install"), *args], check=True, timeout=120, capture_output=True)
    return calls.read_text().splitlines() if calls.exists() else []


def test_pip_runs_once_until_pyproject_or_what_is_asked_for_changes(checkout):
    [first] = install(checkout)
    assert first.endswith("-e .")
    assert install(checkout) == []  # installed and current: no pip, so no network needed

    [test, pinned] = install(checkout, "test")
    assert test.endswith("-e .[test] mitmproxy==11.0.*")  # the test leg pins its mitmproxy
    assert pinned.endswith("--require-hashes -r tests/requirements.txt")  # what the tests pin by hash
    assert install(checkout, "test") == []
    assert install(checkout) == []  # the test install holds all that a plain one needs

    with open(checkout / "pyproject.toml", "a") as pyproject:
        pyproject.write("\n# changed\n")
    assert len(install(checkout)) == 1


def test_a_virtualenv_without_its_regcache_command_is_installed_again(checkout):
    install(checkout)
    (checkout / ".venv" / "bin" / "regcache").unlink()
    assert len(install(checkout)) == 1
