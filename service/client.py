"""`resnet-serve predict`: post images to a server's MMS route and print its answer.

It speaks only the MMS 0.4 route (`POST {url}/{model}/predict`, images in multipart `data` parts,
`{"prediction": [[{"class", "probability"}, ...], ...]}` back), so it works against any server that
does, not just ours. It must start fast: httpx and the standard library only, no torch, no server code
(tests/unit/test_client.py holds that wall).
"""

from __future__ import annotations

import json
import mimetypes
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import httpx

PROG = "resnet-serve"
DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "RESNET_SERVE_URL"
DEFAULT_MODEL = "resnet18v1"
# A server message about one image of several starts so (service/engine/pipeline.py); any other
# server's message passes through unchanged.
_IMAGE_OF = re.compile(r"^image (\d+) of (\d+): ")
_BODY_EXCERPT_CHARS = 200


class ExitCode(IntEnum):
    """What `resnet-serve predict` exits with; documented in the README."""

    OK = 0
    HTTP_ERROR = 1  # the server answered with an error status (its message on stderr)
    BAD_INPUT = 2  # a local problem: an unreadable image, a bad flag or URL (argparse's code)
    UNREACHABLE = 3  # no answer: connection refused, DNS, timeout, connection dropped


class ClientError(Exception):
    """A failure that ends the command: the message for stderr and the exit code."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Upload:
    """One image as given on the command line, read before anything is sent."""

    shown_as: str  # the path as the user typed it: the table and the error messages name it so
    data: bytes

    @classmethod
    def read(cls, path: Path) -> Upload:
        try:
            return cls(str(path), path.read_bytes())
        except OSError as exc:
            raise ClientError(f"cannot read {path}: {exc.strerror or exc}", ExitCode.BAD_INPUT) from None


@dataclass(frozen=True)
class Answer:
    """The server's 200 answer: the body as it came, and the top-k of each image in upload order."""

    text: str
    predictions: list[list[tuple[str, float]]]


def resolve_url(flag: str | None, environ: Mapping[str, str] | None = None) -> str:
    """`--url` wins over `RESNET_SERVE_URL`, which wins over the local default."""
    environ = os.environ if environ is None else environ
    return flag or environ.get(URL_ENV) or DEFAULT_URL


def predict_url(url: str, model: str) -> str:
    return f"{url.rstrip('/')}/{quote(model, safe='')}/predict"


def request_predictions(
    uploads: Sequence[Upload], *, url: str, model: str, topk: int | None, timeout_s: float
) -> Answer:
    """All images in one request (the MMS contract: one inner list per `data` part, in order)."""
    files = [("data", (Path(u.shown_as).name, u.data, _content_type(u.shown_as))) for u in uploads]
    params = {} if topk is None else {"topk": topk}
    try:
        with httpx.Client(timeout=timeout_s) as client:
            response = client.post(predict_url(url, model), files=files, params=params)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise ClientError(f"invalid --url {url!r}: {exc}", ExitCode.BAD_INPUT) from None
    except httpx.TimeoutException:
        raise ClientError(f"{url} did not answer within {timeout_s:g} s", ExitCode.UNREACHABLE) from None
    except httpx.TransportError as exc:
        raise ClientError(f"cannot reach {url}: {exc}", ExitCode.UNREACHABLE) from None
    if response.is_error:
        raise ClientError(_error_message(response, uploads), ExitCode.HTTP_ERROR)
    return Answer(response.text, _parse_predictions(response, len(uploads)))


def render_table(uploads: Sequence[Upload], predictions: Sequence[Sequence[tuple[str, float]]]) -> str:
    """One block per image, in order, its name on the block's first row; columns aligned over all blocks."""
    header = ("image", "class", "probability")
    blocks = [_block(upload.shown_as, classes) for upload, classes in zip(uploads, predictions, strict=True)]
    rows = [header, *(row for block in blocks for row in block)]
    image_width = max(len(row[0]) for row in rows)
    class_width = max(len(row[1]) for row in rows)
    prob_width = max(len(row[2]) for row in rows)

    def line(row: tuple[str, str, str]) -> str:
        return f"{row[0]:<{image_width}}  {row[1]:<{class_width}}  {row[2]:>{prob_width}}".rstrip()

    parts = [line(header)]
    for block in blocks:
        parts.append("")
        parts.extend(line(row) for row in block)
    return "\n".join(parts)


def _block(image: str, classes: Sequence[tuple[str, float]]) -> list[tuple[str, str, str]]:
    if not classes:
        return [(image, "(no classes)", "")]
    return [
        (image if rank == 0 else "", label, f"{probability:.4f}") for rank, (label, probability) in enumerate(classes)
    ]


def run(
    images: Sequence[Path],
    *,
    url: str | None,
    model: str = DEFAULT_MODEL,
    topk: int | None = None,
    as_json: bool = False,
    timeout_s: float = 60.0,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """The whole command: read the images, ask the server, print the table (or its JSON); the exit code."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    server = resolve_url(url)
    try:
        uploads = [Upload.read(path) for path in images]
        answer = request_predictions(uploads, url=server, model=model, topk=topk, timeout_s=timeout_s)
    except ClientError as exc:
        print(f"{PROG}: {exc.message}", file=err)
        return exc.code
    print(answer.text if as_json else render_table(uploads, answer.predictions), file=out)
    return ExitCode.OK


def _content_type(name: str) -> str:
    # The server sniffs the bytes; the declared type only helps other servers and proxies.
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _error_message(response: httpx.Response, uploads: Sequence[Upload]) -> str:
    """`404 ModelNotFound: …` from our `{"code", "type", "message"}` body; status and an excerpt otherwise.
    A message about one image of several names its file."""
    status = f"{response.status_code} {response.reason_phrase}".strip()
    body = _json_or_none(response)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        message: str = body["message"]
        match = _IMAGE_OF.match(message)
        if match and int(match.group(2)) == len(uploads) and 1 <= int(match.group(1)) <= len(uploads):
            message = f"{uploads[int(match.group(1)) - 1].shown_as} ({match.group(0)[:-2]}): {message[match.end() :]}"
        kind = body.get("type")
        text = f"{response.status_code} {kind}: {message}" if isinstance(kind, str) else f"{status}: {message}"
    else:
        excerpt = " ".join(response.text.split())[:_BODY_EXCERPT_CHARS]
        text = f"HTTP {status}" + (f": {excerpt}" if excerpt else "")
    retry_after = response.headers.get("retry-after")
    if retry_after is not None:
        text += f" (Retry-After: {retry_after})"
    return text


def _parse_predictions(response: httpx.Response, expected: int) -> list[list[tuple[str, float]]]:
    """The MMS 0.4 body, checked: a server that answers in another shape gets a clear error, not a traceback."""
    body = _json_or_none(response)
    prediction = body.get("prediction") if isinstance(body, dict) else None
    try:
        if not isinstance(prediction, list):
            raise TypeError("no prediction list")
        parsed = [[(str(item["class"]), float(item["probability"])) for item in classes] for classes in prediction]
    except (KeyError, TypeError, ValueError):
        excerpt = " ".join(response.text.split())[:_BODY_EXCERPT_CHARS]
        raise ClientError(
            f"the server's answer is not an MMS 0.4 prediction body: {excerpt}",
            ExitCode.HTTP_ERROR,
        ) from None
    if len(parsed) != expected:
        raise ClientError(f"sent {expected} images but the server answered for {len(parsed)}", ExitCode.HTTP_ERROR)
    return parsed


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
