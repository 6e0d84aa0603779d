"""``smtpproxy web``: sessions as sequence diagrams, messages as mail, two
sessions side by side (docs/web.md). An ASGI application (Starlette) served
by Hypercorn's trio worker, Jinja2 templates, plain HTML/CSS/JS."""
