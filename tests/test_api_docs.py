"""The examples of docs/python-api.md work as written: each ``python``
block is run as a script (its asserts are its checks), and all of them
pass ``mypy --strict`` (the package is typed: ``py.typed``)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import smtpproxy_env

#: the repository: mypy does not follow an editable install's import hook
DOC = Path(__file__).resolve().parent.parent / "docs" / "python-api.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_the_page_has_examples() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_example_runs(tmp_path: Path, number: int) -> None:
    script = tmp_path / f"example{number}.py"
    script.write_text(BLOCKS[number])
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=smtpproxy_env(tmp_path),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_examples_pass_mypy_strict(tmp_path: Path) -> None:
    if (
        shutil.which("mypy") is None
        and subprocess.run(
            [sys.executable, "-m", "mypy", "--version"], capture_output=True, check=False
        ).returncode
    ):
        pytest.skip("mypy is not installed (pip install -e '.[dev]')")
    for number, block in enumerate(BLOCKS):
        (tmp_path / f"example{number}.py").write_text(block)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        env={**smtpproxy_env(tmp_path), "MYPYPATH": str(DOC.parent.parent)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
