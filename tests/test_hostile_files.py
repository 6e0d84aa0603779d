"""Hostile recording files and output folders (issue 12, items 1 and 7):
``export`` stays inside its folder and never follows or overwrites what it
finds there; the reader reads only regular files with bounded lines; one bad
file in a folder does not hide the others. Each runs the real command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_recordings import MESSAGE, run_cli
from test_recordings import good_recording as _good_recording  # noqa: F401  (registers the fixture)

from smtpproxy.recording import read_recording


@pytest.fixture(scope="module")
def good(_good_recording: Path) -> Path:  # noqa: F811  (a fixture's argument, not a redefinition)
    """One real session with one message (smtplib to the Sink through the
    proxy): test_recordings' recording, made once."""
    return _good_recording


def _with_session(good: Path, folder: Path, session: object) -> Path:
    lines = good.read_text("utf-8").splitlines(keepends=True)
    header = json.loads(lines[0])
    header["session"] = session
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "20200101T000000000Z-hostile.jsonl"
    path.write_text(json.dumps(header) + "\n" + "".join(lines[1:]), "utf-8")
    return path


# -- export ------------------------------------------------------------------


@pytest.mark.parametrize(
    "session",
    [
        "../../victim/settings.x",
        "/tmp/smtpproxy-victim/settings",
        "..",
        "ABCDEF12.x",
        "12345678/..",
        7,
    ],
)
def test_export_refuses_a_session_that_is_not_an_id(
    good: Path, tmp_path: Path, session: object
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "settings.x").write_text("keep me")
    bad = _with_session(good, tmp_path / "work" / "rec", session)
    out = tmp_path / "work" / "out" / "deep"
    done = run_cli(tmp_path, "export", str(bad), "--eml", str(out))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "damaged header: session" in done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert (victim / "settings.x").read_text() == "keep me"
    assert sorted(p.name for p in victim.iterdir()) == ["settings.x"]
    assert not out.exists() or not any(out.iterdir())
    assert not Path("/tmp/smtpproxy-victim").exists()


def test_export_does_not_follow_a_planted_symlink_or_overwrite(good: Path, tmp_path: Path) -> None:
    session = read_recording(good).header.session
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "precious"
    target.write_text("keep me")
    (out / f"{session}-001.eml").symlink_to(target)
    existing = out / f"{session}-001.json"
    existing.write_text("mine")

    done = run_cli(tmp_path, "export", str(good), "--eml", str(out))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert f"{session}-001.eml: exists; not overwritten (--force replaces it)" in done.stderr
    assert target.read_text() == "keep me"
    assert existing.read_text() == "mine"
    assert (out / f"{session}-001.eml").is_symlink()

    done = run_cli(tmp_path, "export", str(good), "--eml", str(out), "--force")
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert target.read_text() == "keep me"
    eml = out / f"{session}-001.eml"
    assert not eml.is_symlink() and eml.read_bytes() == MESSAGE
    assert eml.stat().st_mode & 0o777 == 0o600
    assert json.loads(existing.read_text())["session"] == session


def test_two_recordings_claiming_one_session_do_not_overwrite_each_other(
    good: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "rec" / good.name.replace(".jsonl", "-copy.jsonl")
    copy.parent.mkdir()
    copy.write_bytes(good.read_bytes())
    out = tmp_path / "out"
    done = run_cli(tmp_path, "export", str(good), str(copy), "--eml", str(out), "--force")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "written already from another recording of session" in done.stderr
    assert len(list(out.glob("*.eml"))) == 1


# -- reading hostile files ------------------------------------------------------


@pytest.mark.parametrize("command", [["show"], ["show", "--json"], ["export", "--eml", "out"]])
def test_a_name_that_is_a_device_is_refused_at_once(tmp_path: Path, command: list[str]) -> None:
    link = tmp_path / "20200101T000000000Z-zero.jsonl"
    link.symlink_to("/dev/zero")
    args = [command[0], str(link), *command[1:]]
    done = run_cli(tmp_path, *args)
    assert done.returncode == 2, done
    assert done.stderr == f"Error: {link}: is a device or socket, not a recording file\n"


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "20200101T000000000Z-fifo.jsonl"
    os.mkfifo(fifo)
    done = run_cli(tmp_path, "show", str(tmp_path))  # run_cli's timeout would fail a hang
    assert done.returncode == 2, done
    assert done.stderr == f"Error: {fifo}: is a FIFO, not a recording file\n"


def test_a_line_longer_than_any_recording_writes_is_refused(good: Path, tmp_path: Path) -> None:
    lines = good.read_text("utf-8").splitlines(keepends=True)
    note = json.dumps(
        {"t": 0.1, "type": "note", "side": "server", "kind": "x", "text": "A" * (17 << 20)}
    )
    bad = tmp_path / "20200101T000000000Z-long.jsonl"
    bad.write_text(lines[0] + note + "\n" + "".join(lines[1:]), "utf-8")
    done = run_cli(tmp_path, "show", str(bad))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"Error: {bad}:2: a line longer than 16 MiB is not a recording's")


def test_one_unreadable_recording_does_not_hide_the_others(good: Path, tmp_path: Path) -> None:
    folder = tmp_path / "rec"
    folder.mkdir()
    (folder / good.name).write_bytes(good.read_bytes())
    broken = folder / "20200101T000000000Z-broken.jsonl"
    broken.write_text('{"format": "smtpproxy-recording", "version": 2, "session": "../x"}\n')
    session = read_recording(good).header.session

    done = run_cli(tmp_path, "show", str(folder))
    assert done.returncode == 1, done
    assert len(done.lines) == 2 and session in done.lines[1]
    assert done.stderr.splitlines() == [
        (
            f'Error: {broken}:1: damaged header: session "../x" is not a session id '
            "(8 to 32 lowercase hex digits) (skipped)"
        ),
        "1 of 2 recording(s) could not be read",
    ]

    out = tmp_path / "out"
    done = run_cli(tmp_path, "export", str(folder), "--eml", str(out))
    assert done.returncode == 1, done
    assert done.lines == [str(out / f"{session}-001.eml")]
    assert (out / f"{session}-001.eml").read_bytes() == MESSAGE

    done = run_cli(tmp_path, "show", "--json", str(folder))
    assert done.returncode == 1 and len(done.lines) > 10
