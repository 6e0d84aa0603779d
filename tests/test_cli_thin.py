"""The thin CLI (issue 13, item 6): the errors a user causes before or
around the modules the commands call stay one line with their exit code,
and a usage error comes before anything is made on disk."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import free_port, run_smtpproxy_once

DATA = Path(__file__).parent / "data"


def test_key_without_cert_is_a_usage_error_before_anything_is_made(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not used\n")
    done = run_smtpproxy_once(
        "record", "--listen", f"127.0.0.1:{free_port()}",
        "--recordings", str(tmp_path / "recordings"), "--key", str(key),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == "Error: --key goes with --cert"
    assert not (tmp_path / "recordings").exists()
    assert not (tmp_path / ".smtpproxy-home").exists()


def test_export_into_a_folder_that_cannot_be_made(tmp_path: Path) -> None:
    rec = tmp_path / "a.jsonl"
    shutil.copy(DATA / "v1-smtplib-auth-plain.jsonl", rec)
    (tmp_path / "afile").write_text("not a folder\n")
    done = run_smtpproxy_once(
        "export", str(rec), "--eml", str(tmp_path / "afile" / "out"), cwd=tmp_path
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"Error: cannot write to {tmp_path / 'afile' / 'out'}: ")
    assert (tmp_path / "afile").read_text() == "not a folder\n"


def test_ca_home_that_cannot_be_made(tmp_path: Path) -> None:
    # SMTPPROXY_HOME (set by run_smtpproxy_once) under a regular file
    (tmp_path / ".smtpproxy-home").write_text("not a folder\n")
    done = run_smtpproxy_once("ca", cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"Error: cannot use {tmp_path / '.smtpproxy-home'}: ")
    assert line.endswith("; set SMTPPROXY_HOME to a writable folder")
    assert done.stdout == ""


def test_record_with_a_ca_home_that_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / ".smtpproxy-home").write_text("not a folder\n")
    done = run_smtpproxy_once(
        "record", "--listen", f"127.0.0.1:{free_port()}", "--recordings", str(tmp_path / "rec"),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"Error: cannot set up the local CA in {tmp_path / '.smtpproxy-home'}: ")
    assert line.endswith("; set SMTPPROXY_HOME to a writable folder, or give --cert/--key")
