"""SMTP text, read and written: the pieces of the protocol that need no
state. Lines and their text, command verbs and paths (RFC 5321 4.1), reply
codes and RFC 3463 enhanced codes, EHLO capabilities (4.1.1.1), dot-stuffing
(4.5.2) and message header summaries. ``Conversation`` uses these, and so does
the recording reader to derive what the file leaves out: one parser.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from email.header import decode_header, make_header

__all__ = [
    "MAX_HEADER",
    "MessageHead",
    "Unstuffer",
    "auth_response_fields",
    "command_fields",
    "decode_line",
    "dot_stuff",
    "enhanced_code",
    "format_reply",
    "line_text",
    "parse_capabilities",
    "parse_path",
    "reply_fields",
    "split_command",
    "summarise_headers",
]

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_SUMMARY_HEADERS = ("From", "To", "Cc", "Subject", "Date", "Message-ID")
_WANTED = {name.lower(): name for name in _SUMMARY_HEADERS}


#: at most this much of a message is kept to summarise its header
MAX_HEADER = 64 * 1024


class MessageHead:
    """The start of a message as its pieces go by, up to the blank line
    that ends the header (at most ``MAX_HEADER`` octets): what
    ``summarise_headers`` reads. The Conversation keeps one per message, and
    the recording reader one per message it reads back, so both summarise the
    same octets."""

    __slots__ = ("data", "done")

    def __init__(self) -> None:
        self.data = bytearray()
        self.done = False

    def add(self, piece: bytes) -> None:
        if self.done:
            return
        self.data += piece[: MAX_HEADER - len(self.data)]
        if b"\r\n\r\n" in self.data or b"\n\n" in self.data or len(self.data) >= MAX_HEADER:
            self.done = True

    def headers(self) -> dict[str, str]:
        return summarise_headers(bytes(self.data))


#: the last header block summarised and its summary: the recorder asks again
#: for the message the Conversation has just summarised
_last_summary: tuple[bytes, dict[str, str]] = (b"\0", {})


def summarise_headers(head: bytes) -> dict[str, str]:
    """The main headers of a message (RFC 5322 section 2.2: unfolded, MIME
    encoded-words decoded). Only the header block is read."""
    global _last_summary
    last = _last_summary
    if head == last[0]:
        return dict(last[1])
    out = _summarise(head)
    _last_summary = (head, out)
    return dict(out)


def _summarise(head: bytes) -> dict[str, str]:
    end = head.find(b"\r\n\r\n")
    if end < 0:
        end = head.find(b"\n\n")
    block = head if end < 0 else head[:end]
    out: dict[str, str] = {}
    name: str | None = None
    for raw_line in block.decode("utf-8", errors="replace").splitlines():
        if raw_line[:1] in (" ", "\t"):
            if name is not None:
                out[name] += " " + raw_line.strip()
            continue
        key, colon, value = raw_line.partition(":")
        name = _WANTED.get(key.strip().lower()) if colon else None
        if name is not None and name not in out:
            out[name] = value.strip()
        elif name is not None:
            name = None  # keep the first occurrence
    for key, value in out.items():
        if "=?" in value:
            try:
                value = str(make_header(decode_header(value)))
            except (ValueError, LookupError, UnicodeError, TypeError):
                pass
        out[key] = " ".join(value.split())
    return out


def parse_path(arg: str) -> str | None:
    """The path of ``MAIL FROM:<a@b> SIZE=1`` or ``RCPT TO:<c@d>`` (RFC 5321 4.1.2)."""
    _, colon, rest = arg.partition(":")
    if not colon:
        return None
    rest = rest.strip()
    if rest.startswith("<"):
        end = rest.find(">")
        return rest[1:end] if end >= 0 else rest[1:]
    return rest.split(" ", 1)[0] if rest else ""


def parse_capabilities(lines: Iterable[str]) -> dict[str, str]:
    """EHLO keywords and their parameters from the lines after the greeting
    line of a 250 reply (RFC 5321 section 4.1.1.1). Repeated AUTH lines, and
    the old ``AUTH=LOGIN`` form, are merged."""
    caps: dict[str, str] = {}
    for line in lines:
        keyword, _, params = line.strip().partition(" ")
        if not keyword:
            continue
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):
            params = keyword[5:] + (" " + params if params else "")
            keyword = "AUTH"
        if keyword == "AUTH" and "AUTH" in caps:
            seen = caps["AUTH"].split()
            params = " ".join(seen + [m for m in params.upper().split() if m not in seen])
        elif keyword == "AUTH":
            params = " ".join(dict.fromkeys(params.upper().split()))
        caps[keyword] = params.strip()
    return caps


def format_reply(code: int, *lines: str) -> bytes:
    """Serialise a reply: ``250-a`` ... ``250 z`` with CRLF line ends."""
    if not lines:
        lines = ("",)
    last = len(lines) - 1
    return "".join(
        f"{code}{' ' if i == last else '-'}{line}\r\n" for i, line in enumerate(lines)
    ).encode("utf-8")


class Unstuffer:
    """Undo dot-stuffing of a DATA body as it streams (RFC 5321 section 4.5.2).

    Feed the wire bytes of the body (``MessageData.raw``) and get the message
    content; the ``.CRLF`` terminator and anything after it are dropped.
    """

    def __init__(self) -> None:
        self._carry = b""
        self._line_start = True
        self.done = False

    def feed(self, wire: bytes, final: bool = False) -> bytes:
        if self.done:
            return b""
        data = self._carry + wire
        self._carry = b""
        out: list[bytes] = []
        i, n = 0, len(data)
        while i < n:
            if self._line_start:
                if data[i] == 0x2E:  # "."
                    if n - i < 3 and not final:
                        self._carry = data[i:]
                        break
                    if data[i : i + 3] == b".\r\n":
                        self.done = True
                        break
                    i += 1  # a stuffed dot
                self._line_start = False
                continue
            j = data.find(b"\r\n", i)
            if j < 0:
                if data.endswith(b"\r") and not final:
                    out.append(data[i : n - 1])
                    self._carry = b"\r"
                else:
                    out.append(data[i:])
                break
            out.append(data[i : j + 2])
            i = j + 2
            self._line_start = True
        return b"".join(out)

    def end(self) -> bytes:
        """Flush what was held back (only a body cut short has any)."""
        return self.feed(b"", final=True)


_LINE_END = re.compile(rb"\r\n|\r|\n")


def dot_stuff(content: bytes) -> tuple[bytes, bool]:
    """Message content as a DATA body on the wire, and whether its line ends
    had to change: each line that starts with "." gets one more and ".CRLF"
    ends the body (RFC 5321 section 4.5.2).

    A bare CR or LF becomes CRLF first (section 2.3.8 allows them in no
    other form), and a last line without its CRLF gets one (4.1.1.4: the
    terminator is the end of a line). So no reader, strict or one that also
    ends lines at a bare LF or CR, finds a "." line before the terminator:
    content cannot end the message early and be read as commands. The
    ``Unstuffer`` gives back the content with CRLF line ends."""
    lines = _LINE_END.split(content)
    ends = len(lines) - 1
    ended = lines[-1] == b""
    if ended:
        lines.pop()  # the content ended with a line end, or is empty
    # every CRLF of the content is one of the line ends the split found
    changed = ends != content.count(b"\r\n") or not ended
    wire = b"".join(b"." + line + b"\r\n" if line[:1] == b"." else line + b"\r\n" for line in lines)
    return wire + b".\r\n", changed


def decode_line(raw: bytes) -> tuple[str, tuple[str, ...]]:
    """A line's text without its line end, and flags for what was odd."""
    flags: tuple[str, ...] = ()
    if raw.endswith(b"\r\n"):
        line = raw[:-2]
    elif raw.endswith(b"\n"):
        line = raw[:-1]
        flags = ("bare_lf",)
    else:
        line = raw
        flags = ("no_eol",)
    try:
        return line.decode("utf-8"), flags
    except UnicodeDecodeError:
        return line.decode("utf-8", errors="backslashreplace"), flags + ("bad_utf8",)


def line_text(raw: bytes) -> str:
    """The text of one line as the events give it (no line end; bytes that
    are not UTF-8 escaped)."""
    return decode_line(raw)[0]


#: What ends a command's verb. RFC 5321 says SP; Postfix also takes any
#: other whitespace (``AUTH<TAB>PLAIN ...`` authenticates), so the observer
#: reads such a line as the server does (docs/interop.md).
_VERB_END = re.compile(r"[ \t\x0b\x0c\r]")


def split_command(text: str) -> tuple[str, str, str | None]:
    """Verb (upper-cased), argument and, for MAIL and RCPT, the path."""
    verb, _, arg = text.partition(" ")
    if not verb.isalpha() and _VERB_END.search(verb):
        verb, arg = _VERB_END.split(text, 1)
    verb = verb.upper()
    return verb, arg, parse_path(arg) if verb in ("MAIL", "RCPT") else None


def enhanced_code(first_line: str) -> str | None:
    """The RFC 3463 status code at the start of a reply's text, if any."""
    m = _ENHANCED.match(first_line)
    return ".".join(m.groups()) if m else None


def command_fields(raw: bytes) -> dict[str, object]:
    """``Command.verb``, ``arg`` and ``path``, from the command's raw line."""
    verb, arg, path = split_command(line_text(raw))
    return {"verb": verb, "arg": arg, "path": path}


def auth_response_fields(raw: bytes) -> dict[str, object]:
    """``AuthResponse.text``, from the raw line."""
    return {"text": line_text(raw)}


def reply_fields(raw: bytes) -> dict[str, object]:
    """``Reply.code``, ``lines`` and ``enhanced``, from the reply's raw lines."""
    lines = tuple(line_text(line)[4:] for line in raw.splitlines(keepends=True))
    return {
        "code": int(raw[:3]),
        "lines": lines,
        "enhanced": enhanced_code(lines[0]) if lines else None,
    }
