"""Older format versions, read as the current one.

Each step takes one line of a version ``n`` file (after the header, parsed
from its JSON) and gives the lines of version ``n + 1`` that say the same,
so that the reader knows one layout only: the current one. The reader takes
a file's lines through the chain of steps from the version in its header up
to ``VERSION``; the header keeps the version the file was written in. This
is how mitmproxy reads old flow files (a converter per version, applied in
a chain), per line here because a recording is read a line at a time.

A step raises ValueError (or KeyError, TypeError) for a line that no writer
of its version wrote; the reader reports it with the file and line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .model import VERSION

#: A line of a recording after the header, as ``json.loads`` gives it: an
#: event or close line (an object), or an input line (an array).
Line = dict[str, Any] | list[Any]
#: One step: a line of one version to the lines of the next.
Migration = Callable[[Line], Sequence[Line]]


def v1_to_v2(line: Line) -> Sequence[Line]:
    """Version 1 to version 2. Version 1 wrote every event as an event line
    and the session's totals on the close line. Both read the same in
    version 2: event lines are its event layout (what ``--redact`` writes),
    and totals written on a close line stand over those the reader counts.
    So each line goes on as it is; an input line, which version 2 brought
    and no version 1 writer wrote, is refused."""
    if isinstance(line, list):
        raise ValueError("input lines are format version 2, this file says 1")
    return (line,)


#: The step from each older version, keyed by the version it reads.
MIGRATIONS: dict[int, Migration] = {1: v1_to_v2}


def migration(version: int) -> Migration | None:
    """The chain of steps taking a line of ``version`` to the current
    version; None for the current version, which needs none. ``version``
    must be one the reader accepts (``VERSION`` or a key of ``MIGRATIONS``)."""
    steps = [MIGRATIONS[v] for v in range(version, VERSION)]
    if not steps:
        return None
    if len(steps) == 1:
        return steps[0]

    def chain(line: Line) -> Sequence[Line]:
        lines: Sequence[Line] = (line,)
        for step in steps:
            lines = [out for one in lines for out in step(one)]
        return lines

    return chain
