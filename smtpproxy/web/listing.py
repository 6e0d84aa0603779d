"""The sessions list (``/``): sorted by any column, filtered by any column
and by free text, paged from the index. Every state of it is in its URL
(``?sort=&order=&page=&q=&COLUMN=``), so a link shows what its sender saw.

``/rows`` is the same list without the page around it: what the page's
script fetches when ``record --web`` says a session opened or closed
(smtpproxy/web/live.py), for the filters in its own URL.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import live
from .app import Context
from .index import NAMES, FilterError, Page

__all__ = ["routes"]

#: the query parameters the list knows; others are not carried on in links
KNOWN = frozenset({"q", "sort", "order", "page", *NAMES})
#: a page number past this is no page (and no 64-bit OFFSET overflow)
MAX_PAGE = 10**9


def routes(ctx: Context) -> list[Route]:
    async def read(request: Request) -> tuple[dict[str, Any], int]:
        q = request.query_params
        query = {k: q[k] for k in q if k in KNOWN and q[k] != ""}
        try:
            page_no = min(MAX_PAGE, max(1, int(q.get("page", "1"))))
        except ValueError:
            page_no = 1
        filters = {name: q.get(name, "") for name in NAMES}
        size = ctx.config.page_size
        error = ""
        try:
            # a worker thread: a page over 100,000 rows must not hold up
            # the proxy that ``record --web`` runs in the same loop
            page = await run_in_threadpool(
                lambda: ctx.index.page(
                    filters=filters,
                    text=q.get("q", ""),
                    sort=q.get("sort", "start"),
                    descending=q.get("order", "desc") != "asc",
                    offset=(page_no - 1) * size,
                    limit=size,
                )
            )
        except FilterError as exc:
            page, error = Page([], 0, 0, size), str(exc)
        values = {
            "page": page,
            "page_no": page_no,
            "query": query,
            "filters": filters,
            "error": error,
            "active": ctx.live.active if ctx.live is not None else frozenset(),
            "live": ctx.live is not None,
            "sorted_by": q.get("sort") if q.get("sort") in NAMES else "start",
            "ascending": q.get("order") == "asc",
            "by_column": any(name in query for name in NAMES),
        }
        return values, 400 if error else 200

    async def sessions(request: Request) -> Response:
        values, status = await read(request)
        response = ctx.render("sessions.html", **values)
        response.status_code = status
        return response

    async def rows(request: Request) -> Response:
        values, status = await read(request)
        response = ctx.render("sessions_rows.html", **values)
        response.status_code = status
        return response

    return [
        Route("/", sessions, name="sessions"),
        Route("/rows", rows, name="rows"),
        *live.routes(ctx.live),
    ]
