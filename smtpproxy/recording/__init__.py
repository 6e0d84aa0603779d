"""The recording file format: one writer, one reader.

A recording is JSON Lines, one file per client session:

* line 1, the header: ``{"format": "smtpproxy-recording", "version": 2, ...}``;
* then, in the order the proxy saw them, each with ``t`` (seconds since the
  session started):

  - input lines, JSON arrays: what the session's ``Conversation`` was given,
    ``[t, "c", "bytes the client sent"]``, ``[t, "s", ...]`` for the server
    (``"c64"``/``"s64"``: base64) and ``[t, "tls_established"]`` /
    ``[t, "implicit_tls"]``. The reader feeds them through a Conversation
    again, which is deterministic, and so gets every SMTP event back;
  - event lines, JSON objects with ``type``: what the Conversation cannot
    derive (the proxy's notes, TLS handshakes), or every event when the
    recording is redacted (``--redact`` rewrites events, not reads);

* last, ``{"type": "close", ...}`` saying who closed and why; it also ends
  the Conversation (what it held half read comes out).

Version 1 files (event lines only, totals on the close line) are read
through a migration step to version 2. ``docs/recording-format.md``
documents the layout; this package is the only code that knows it:

* ``model``: the header, entries, close line and session id, shared by both;
* ``codec``: an event or a read to one line, an event line back to its event;
* ``writer``: ``Recorder``, which writes a session as it happens;
* ``reader``: ``read_recording``, the one reader, and its defences against
  hostile files;
* ``migrate``: the steps that take an older version's lines to the current.
"""

from __future__ import annotations

# The codec's functions (``show --json`` and the tests use them), ``_dumps``
# (the tests) and the reader's line limit stay importable from here, as
# before the split, without joining ``__all__``.
from .codec import _dumps as _dumps
from .codec import decode_event as decode_event
from .codec import encode_event as encode_event
from .codec import encode_line as encode_line
from .model import (
    FORMAT,
    VERSION,
    Close,
    Entry,
    Header,
    Recording,
    RecordingError,
    new_session_id,
    note_in_place,
)
from .reader import MAX_RECORD_LINE as MAX_RECORD_LINE
from .reader import iter_recordings, read_recording
from .writer import Recorder, ensure_private_dir

__all__ = [
    "FORMAT",
    "VERSION",
    "Close",
    "Entry",
    "Header",
    "Recorder",
    "Recording",
    "RecordingError",
    "ensure_private_dir",
    "iter_recordings",
    "new_session_id",
    "note_in_place",
    "read_recording",
]
