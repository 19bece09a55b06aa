"""The page at / in-process: its files come from the package, its Grafana link is escaped, and it
stays out of the OpenAPI document. tests/browser drives it in a real browser."""

from __future__ import annotations

import html
import tomllib
from pathlib import Path

from fastapi.testclient import TestClient

from service.api.app import create_app
from tests.conftest import REPO
from tests.http.conftest import cached_loader

STATIC = REPO / "service" / "api" / "static"


def test_the_page_and_its_assets_are_served_with_a_same_origin_policy(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/static/demo.js" defer></script>' in page.text
    assert 'data-grafana-url=""' in page.text  # not configured: no link
    for name, media_type in (("demo.js", "javascript"), ("demo.css", "text/css")):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and media_type in asset.headers["content-type"]
        assert asset.content == (STATIC / name).read_bytes()
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(path.startswith("/static") for path in paths)


def test_the_grafana_url_reaches_the_page_escaped(make_settings):
    hostile = 'http://grafana.example/?a="><script>alert(1)</script>'
    app = create_app(make_settings(grafana_url=hostile), load_models=cached_loader)
    with TestClient(app) as client:
        page = client.get("/").text
    assert f'data-grafana-url="{html.escape(hostile, quote=True)}"' in page
    assert "<script>alert(1)" not in page


def test_every_static_file_is_package_data(tmp_path: Path):
    """A non-editable install ships only what package-data names."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["service"]
    shipped = {path for pattern in patterns for path in (REPO / "service").glob(pattern)}
    assert {"index.html", "demo.js", "demo.css"} <= {path.name for path in STATIC.iterdir()}
    assert set(STATIC.iterdir()) <= shipped
