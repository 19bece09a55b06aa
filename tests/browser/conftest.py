"""A live server (resnet18v1 and resnet50v1, seeded random weights) and Debian's Chromium driven by
playwright, for the tests of the page at /."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright import sync_api as playwright_sync

from tests.integration.live import LiveServer, running

# Debian's package (scripts/install-chromium.sh); playwright's own browser download needs the internet.
CHROMIUM = os.environ.get("RESNET_SERVE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Generous: a forward of resnet50 on a busy 2-core machine; the waits poll, so a fast run stays fast.
TIMEOUT_MS = 30_000
playwright_sync.expect.set_options(timeout=TIMEOUT_MS)
GRAFANA_URL = "http://grafana.example:3000/d/resnet-serve"
MAX_UPLOAD_BYTES = 1_000_000


@pytest.fixture(scope="module")
def server(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("browser") / "server.log"
    flags = ("--models", "resnet18v1,resnet50v1", "--grafana-url", GRAFANA_URL,
             "--max-upload-bytes", str(MAX_UPLOAD_BYTES))  # fmt: skip
    with running(weights_dir, log, *flags) as live:
        yield live


@pytest.fixture(scope="module")
def browser() -> Iterator[playwright_sync.Browser]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: run scripts/install-chromium.sh or set RESNET_SERVE_CHROMIUM")
    with playwright_sync.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: playwright_sync.Browser, server: LiveServer) -> Iterator[playwright_sync.Page]:
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(TIMEOUT_MS)
    opened.goto(server.url + "/")
    playwright_sync.expect(opened.locator("#model")).to_be_enabled()
    yield opened
    context.close()
