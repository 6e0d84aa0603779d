"""Two sessions side by side (``/compare?a=<id>&b=<id>``): their exchanges
aligned and compared by the rules of ``smtpproxy diff`` (``diff.align``:
the same reply code and enhanced code, EHLO capabilities as sets, what
commands mean; ``strict=1`` adds the texts, masked as ``diff --strict``
masks them), in two columns with what differs highlighted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..diff import align, compare_replies, tls_facts
from ..events import Reply
from ..protocol import Exchange
from .app import Context
from .diagram import shown, step_label
from .sessionpage import PageError, error_page, load

__all__ = ["routes"]


@dataclass
class ReplyView:
    code: str
    enhanced: str
    #: the first line's text (after the enhanced code), then the other
    #: lines, each with whether it names a capability that changed
    text: str
    more: list[tuple[str, bool]] = field(default_factory=list)


@dataclass
class Side:
    step: str
    reply: ReplyView | None


@dataclass
class Row:
    a: Side | None
    b: Side | None
    reasons: list[str]
    #: what to highlight: the command, the code, the enhanced code, the text
    command: bool = False
    code: bool = False
    enhanced: bool = False
    text: bool = False

    @property
    def kind(self) -> str:
        if self.a is None:
            return "only-b"
        if self.b is None:
            return "only-a"
        return "differs" if self.reasons else "same"


def _reply_view(reply: Reply | None, changed_caps: set[str]) -> ReplyView | None:
    if reply is None:
        return None
    lines = list(reply.lines) or [""]
    first = lines[0]
    if reply.enhanced and first.startswith(reply.enhanced):
        first = first[len(reply.enhanced) :].lstrip()
    more = []
    for line in lines[1:]:
        keyword = line.split(" ", 1)[0].upper()
        more.append((shown(line), keyword in changed_caps))
    return ReplyView(str(reply.code), shown(reply.enhanced or ""), shown(first), more)


def _changed_capabilities(a: Reply | None, b: Reply | None) -> set[str]:
    if a is None or b is None or a.capabilities is None or b.capabilities is None:
        return set()
    ca, cb = a.capabilities, b.capabilities
    return {k.upper() for k in set(ca) | set(cb) if ca.get(k) != cb.get(k)}


def rows_of(a: list[Exchange], b: list[Exchange], strict: bool) -> list[Row]:
    """The aligned rows, each with what differs marked."""
    out = []
    for aligned in align(a, b, strict):
        ea = a[aligned.a] if aligned.a is not None else None
        eb = b[aligned.b] if aligned.b is not None else None
        ra, rb = (ea.reply if ea else None), (eb.reply if eb else None)
        caps = _changed_capabilities(ra, rb)
        row = Row(
            Side(shown(step_label(ea)[0]), _reply_view(ra, caps)) if ea else None,
            Side(shown(step_label(eb)[0]), _reply_view(rb, caps)) if eb else None,
            [shown(r) for r in aligned.reasons],
        )
        if ea is not None and eb is not None and aligned.reasons:
            reply_reasons = compare_replies(ra, rb, strict)
            row.command = len(reply_reasons) < len(aligned.reasons)
            if ra is not None and rb is not None:
                row.code = ra.code != rb.code
                row.enhanced = not row.code and (ra.enhanced or None) != (rb.enhanced or None)
            row.text = any(r.startswith(("text ", "challenge ")) for r in reply_reasons)
        out.append(row)
    return out


def routes(ctx: Context) -> list[Route]:
    # plain functions: Starlette runs them in its thread pool, so reading a
    # large recording never holds up the loop a proxy may share (record --web)
    def compare(request: Request) -> Response:
        q = request.query_params
        a_id, b_id = q.get("a", "").strip(), q.get("b", "").strip()
        strict = q.get("strict", "") not in ("", "0")
        if not a_id or not b_id:
            return ctx.render("compare.html", a_id=a_id, b_id=b_id, strict=strict, rows=None)
        try:
            a, b = load(ctx, a_id), load(ctx, b_id)
        except PageError as err:
            return error_page(ctx, err)
        rows = rows_of(a.exchanges, b.exchanges, strict)
        tls_a, tls_b = tls_facts(a.recording.events()), tls_facts(b.recording.events())
        tls = [
            (leg, shown(tls_a.get(leg, "none")), shown(tls_b.get(leg, "none")))
            for leg in ("client", "server")
        ]
        return ctx.render(
            "compare.html",
            a_id=a.id,
            b_id=b.id,
            strict=strict,
            a=a.recording.header,
            b=b.recording.header,
            rows=rows,
            differences=sum(1 for r in rows if r.kind != "same"),
            tls=tls,
        )

    return [Route("/compare", compare, name="compare")]
