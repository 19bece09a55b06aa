"""The page at `/` to try the models in a browser: one HTML file, one script, one stylesheet, all
shipped in the package (no build step, no CDN: the server may have no internet). The page talks to
the public API only (`/models`, `POST /{model}/predict`), so it shows what any client would get."""

from __future__ import annotations

import functools
import html
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.engine import Engine

STATIC_PATH = "/static"
GRAFANA_PLACEHOLDER = "{{grafana_url}}"
# Everything from this origin; thumbnails are blob: URLs of the chosen files.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


@functools.cache
def _page_template() -> str:
    return (resources.files("service.api") / "static" / "index.html").read_text(encoding="utf-8")


def static_files() -> StaticFiles:
    """The script and stylesheet, from the installed package (see pyproject's package-data)."""
    return StaticFiles(packages=[("service.api", "static")])


@router.get("/", response_class=HTMLResponse)
async def page(request: Request) -> HTMLResponse:
    engine: Engine = request.app.state.server
    body = _page_template().replace(GRAFANA_PLACEHOLDER, html.escape(engine.plan.grafana_url, quote=True))
    return HTMLResponse(body, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})
