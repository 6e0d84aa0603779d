"""Older recording versions are read through the migration steps in
``smtpproxy.recording.migrate``: a version 1 file's lines, taken through
its step, are a version 2 file that reads the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smtpproxy.recording import VERSION, RecordingError, read_recording
from smtpproxy.recording.migrate import MIGRATIONS, migration, v1_to_v2

V1 = Path(__file__).parent / "data" / "v1-smtplib-auth-plain.jsonl"


def test_every_older_version_has_a_step_and_the_current_none() -> None:
    assert sorted(MIGRATIONS) == list(range(1, VERSION))
    assert migration(VERSION) is None
    assert migration(1) is v1_to_v2


def test_a_version_1_file_migrated_by_hand_reads_as_the_reader_reads_it(tmp_path: Path) -> None:
    """The step's output, written as a version 2 file, is what the reader
    makes of the version 1 file: the same events at the same times, the
    same close line and totals (the ones version 1 wrote stand)."""
    header, *body = V1.read_text().splitlines()
    head = json.loads(header)
    assert head["version"] == 1
    migrated = [json.dumps(out) for line in body for out in v1_to_v2(json.loads(line))]
    v2 = tmp_path / "v2.jsonl"
    v2.write_text("\n".join([json.dumps({**head, "version": 2}), *migrated]) + "\n")
    old, new = read_recording(V1), read_recording(v2)
    assert (old.header.version, new.header.version) == (1, 2)
    assert [(e.t, e.event) for e in new.entries] == [(e.t, e.event) for e in old.entries]
    assert new.close == old.close and old.close is not None
    assert old.close.totals["bytes_from_client"] == 155


def test_the_version_1_step_refuses_an_input_line() -> None:
    with pytest.raises(ValueError, match="input lines are format version 2, this file says 1"):
        v1_to_v2([0.1, "c", "NOOP\r\n"])


@pytest.mark.parametrize("version", [0, -1, VERSION + 1])
def test_a_version_without_a_step_is_refused_in_one_line(tmp_path: Path, version: int) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text(
        json.dumps({"format": "smtpproxy-recording", "version": version, "session": "0000000a"})
        + "\n"
    )
    with pytest.raises(RecordingError) as err:
        read_recording(path)
    assert str(err.value) == (
        f"{path}:1: recording format version {version} is not supported "
        f"(this smtpproxy reads up to {VERSION}; upgrade smtpproxy)"
    )
