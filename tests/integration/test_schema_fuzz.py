"""Schemathesis against the OpenAPI document, fired at a live server (issue 5, "Security").

Schemathesis generates requests for every operation of /openapi.json, valid ones and invalid ones
(wrong types, missing fields, odd headers, strange path and query values), and the server must never
answer 5xx; every error must be our JSON body, without tracebacks or paths. Two ways in:

- the pytest integration (`schema.parametrize()`): Hypothesis-driven, each call checked here too;
- the `st run` CLI in a subprocess: adds schemathesis's coverage phase (boundary values, missing
  and wrongly typed parameters) and stateful phase, with more of its checks.

The document is `create_app(...).openapi()`, what the server serves at /openapi.json, taken at import
because schemathesis's lazy `from_fixture` loader fails on pytest 9 (it reads `request.node._nodeid`,
which pytest no longer has); the eager `parametrize` works under -W error. One change: the `model`
path parameter is pinned to the served model (an enum), or nearly every generated prediction is a
404 that never reaches the upload parsing and the decoder. Negative cases still try other names.

Bounded for CI (~15 s); to fuzz longer by hand:

    SCHEMA_FUZZ_EXAMPLES=500 .venv/bin/pytest tests/integration/test_schema_fuzz.py -q
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from service.api.app import create_app
from service.config import Settings
from service.models.catalog import CATALOG
from service.models.weights import write_random
from tests.hostile_corpus import FORBIDDEN_IN_RESPONSES
from tests.integration.live import LiveServer, running

pytestmark = pytest.mark.integration

MODEL = "resnet18v1"
EXAMPLES = int(os.environ.get("SCHEMA_FUZZ_EXAMPLES", "25"))
CLI_CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
)


def openapi_document() -> dict[str, Any]:
    """The served document, with the `model` path parameter pinned to names the server knows."""
    # Building the app loads no model (that happens in its lifespan): this is only the document.
    document = copy.deepcopy(create_app(Settings(device="cpu")).openapi())
    for operation in (op for ops in document["paths"].values() for op in ops.values()):
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "path" and parameter["name"] == "model":
                parameter["schema"] = {"type": "string", "enum": [MODEL, *CATALOG[MODEL].aliases]}
    return document


DOCUMENT = openapi_document()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    weights = tmp_path_factory.mktemp("schema-fuzz-weights")
    write_random(CATALOG[MODEL], 0, weights)
    log = tmp_path_factory.mktemp("schema-fuzz-log") / "server.log"
    with running(weights, log, "--device", "cpu", "--decode-workers", "2") as server:
        yield server
    assert "unhandled error" not in server.log()


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
def test_no_generated_request_gets_a_server_error(case, live):
    response = case.call(base_url=live.url, timeout=30)
    case.validate_response(response, checks=[not_a_server_error])
    if response.status_code >= 400:
        for word in FORBIDDEN_IN_RESPONSES:
            assert word not in response.text, f"{case.method} {case.formatted_path}: the error leaks {word!r}"
        body = response.json()
        if set(body) == {"error"}:  # the Open Inference Protocol's error shape, on its own routes only
            assert case.formatted_path.startswith("/v2/"), body
            return
        assert set(body) == {"code", "type", "message"}, body
        assert body["code"] == response.status_code, body


def test_schemathesis_cli_finds_no_failure(live, tmp_path):
    document = tmp_path / "openapi.json"
    document.write_text(json.dumps(DOCUMENT))
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", str(document), "--url", live.url,
        "--checks", ",".join(CLI_CHECKS), "--max-examples", str(max(5, EXAMPLES // 2)), "--workers", "1",
        "--request-timeout", "30",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_COLOR": "1"}
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    # Exit 0 with warnings is fine: "schema validation mismatch" says most random "binary" uploads are
    # refused (415), which is right; a schema cannot say "a decodable photo".
    assert "Failures:" not in output, output[-6000:]


@pytest.mark.parametrize(("method", "path"), [("TRACE", f"/{MODEL}/predict"), ("GET", f"/{MODEL}/predict")])
def test_a_405_names_the_allowed_methods(live, method, path):
    response = httpx.request(method, f"{live.url}{path}", timeout=10)
    assert response.status_code == 405
    assert response.json()["type"] == "MethodNotAllowed"
    assert response.headers.get("allow") == "POST"


def test_the_document_describes_the_prediction_routes():
    paths = DOCUMENT["paths"]
    assert "/{model}/predict" in paths and "/predictions/{model}" in paths
    assert schema.raw_schema["info"]["title"] == "resnet-serve"
