"""The sessions list (``/``): sorted, filtered by any column and by free
text, paged from the index."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .app import Context
from .index import COLUMNS

__all__ = ["routes"]


def routes(ctx: Context) -> list[Route]:
    async def sessions(request: Request) -> Response:
        q = request.query_params
        try:
            page_no = max(1, int(q.get("page", "1")))
        except ValueError:
            page_no = 1
        filters = {name: q.get(name, "") for name, _, _ in COLUMNS}
        page = ctx.index.page(
            filters=filters,
            text=q.get("q", ""),
            sort=q.get("sort", "start"),
            descending=q.get("order", "desc") != "asc",
            offset=(page_no - 1) * ctx.config.page_size,
            limit=ctx.config.page_size,
        )
        return ctx.render(
            "sessions.html", page=page, page_no=page_no, query=dict(q), filters=filters
        )

    return [Route("/", sessions, name="sessions")]
