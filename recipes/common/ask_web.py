"""A local web page for one question about one image (standard library only: http.server + email's MIME parser).

    python launch/ask.py --checkpoint runs/vqa-psd --serve --port 8000     # then open http://127.0.0.1:8000/

GET /          the page: choose an image, type a question, press Ask
POST /         the same form (multipart/form-data: image, question[, top]): the page again, with the answers
POST /api/ask  multipart/form-data as above, or JSON {"image_base64": ..., "question": ..., "top": N}:
               200 {"answers": [Answer.to_dict()]}, or 4xx {"error": "one line"}

Bad input (no image, not an image, too large, empty question) is answered 4xx with one line, never a traceback.
"""
from __future__ import annotations

import base64
import html
import json
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from recipes.common.ask import MAX_IMAGE_BYTES, Answer, Asker, AskError

MAX_BODY_BYTES = MAX_IMAGE_BYTES + 64 * 1024  # the image, base64 aside, plus the form's other fields
MAX_JSON_BODY_BYTES = MAX_IMAGE_BYTES * 4 // 3 + 64 * 1024  # base64 makes 3 bytes 4
DRAIN_LIMIT_BYTES = 1 << 30  # an over-large body up to this is read (and dropped) so the client sees the 413


class RequestError(Exception):
    """A request the page cannot answer: an HTTP status and one line for the user."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def parse_multipart(content_type: str, body: bytes) -> dict[str, Any]:
    """multipart/form-data -> {field: str, or (filename, bytes) for a file}."""
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise RequestError(HTTPStatus.BAD_REQUEST, "the form is not multipart/form-data with a boundary")
    fields: dict[str, Any] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        data = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        fields[name] = (filename, data) if filename is not None else data.decode("utf-8", "replace")
    return fields


def _form_inputs(fields: dict[str, Any]) -> tuple[bytes, str, Optional[int]]:
    """(image bytes, question, top) of a form or JSON request; what is missing is a 400."""
    image = fields.get("image")
    if isinstance(image, tuple):
        image = image[1]
    elif "image_base64" in fields:
        try:
            image = base64.b64decode(str(fields["image_base64"]), validate=True)
        except ValueError:
            raise RequestError(HTTPStatus.BAD_REQUEST, "image_base64 is not base64") from None
    if not image:
        raise RequestError(HTTPStatus.BAD_REQUEST, "no image: choose an image file to ask about")
    question = fields.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RequestError(HTTPStatus.BAD_REQUEST, "the question is empty: ask something about the image")
    top = fields.get("top")
    if top in (None, ""):
        return bytes(image), question, None
    try:
        n = int(top)
    except (TypeError, ValueError):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"top must be a whole number, got {top!r}") from None
    if not 1 <= n <= 100:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"top must be between 1 and 100, got {n}")
    return bytes(image), question, n


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medvlm: ask</title>
<style>
body {{ font: 15px system-ui, sans-serif; margin: 2em auto; max-width: 52em; color: #222; }}
h1 {{ font-size: 1.3em; }} .run {{ color: #666; font-size: .9em; }}
form {{ display: grid; grid-template-columns: 7em 1fr; gap: .6em; align-items: center; margin: 1.2em 0; }}
input[type=text] {{ font: inherit; padding: .3em; }} button {{ font: inherit; padding: .3em 1.2em; width: 8em; }}
.error {{ color: #a00; border: 1px solid #a00; padding: .5em; }}
.result {{ display: flex; gap: 1.5em; align-items: flex-start; }}
.result img {{ width: 256px; image-rendering: pixelated; border: 1px solid #ccc; }}
table {{ border-collapse: collapse; }} td, th {{ padding: .2em .8em; border-bottom: 1px solid #ddd; text-align: left; }}
td.score {{ font-family: monospace; text-align: right; }} tr.top td {{ font-weight: bold; }}
</style></head><body>
<h1>Ask the model about an image</h1>
<p class="run">{run}</p>
<form method="post" action="/" enctype="multipart/form-data">
<label for="image">Image</label><input id="image" name="image" type="file" accept="image/*" required>
<label for="question">Question</label><input id="question" name="question" type="text" value="{question}"
 placeholder="e.g. is there a lesion?" required>
<span></span><button type="submit">Ask</button>
</form>
{body}
<p class="run">Rank scores are each answer's log-likelihood given the image and the question (higher is better),
over the run's candidate answers; the top one is what launch/evaluate.py predicts in rank mode.</p>
</body></html>
"""


def render_page(asker: Asker, answer: Optional[Answer] = None, image: Optional[bytes] = None,
                error: Optional[str] = None, question: str = "") -> str:
    """The page, with an answer (and the image asked about) or an error line."""
    body = ""
    if error:
        body = f'<p class="error">{html.escape(error)}</p>'
    elif answer is not None:
        rows = "".join(f'<tr class="{"top" if i == 0 else ""}"><td>{i + 1}</td><td>{html.escape(r.answer)}</td>'
                       f'<td class="score">{r.score:.4f}</td></tr>' for i, r in enumerate(answer.ranked))
        img = (f'<img alt="the image asked about" src="data:image;base64,{base64.b64encode(image).decode()}">'
               if image else "")
        body = (f'<div class="result">{img}<div><p>Q: <b>{html.escape(answer.question)}</b></p>'
                f'<table><tr><th>#</th><th>ranked answer</th><th>score</th></tr>{rows}</table>'
                f'<p>generated: <b>{html.escape(answer.generated)}</b></p>'
                f'<p>evaluate.py\'s answer ({answer.mode}): <b>{html.escape(answer.prediction)}</b></p></div></div>')
    run = f"{asker.kind} VQA run {asker.checkpoint} · {len(asker.candidates)} candidate answers"
    return PAGE.format(run=html.escape(run), question=html.escape(question, quote=True), body=body)


def _error_line(e: BaseException) -> str:
    """The first line of an exception's message ("" for none): what the user is shown."""
    return str(e).splitlines()[0] if str(e) else ""


class AskHandler(BaseHTTPRequestHandler):
    """The page's requests, answered by the class's `asker` under its `lock` (make_handler binds both)."""

    server_version = "medvlm-ask"
    asker: Asker
    lock: Any  # one forward pass at a time: the model is not shared across threads

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass  # one line per request on stderr would bury the answers' own output

    def _send(self, status: int, body: str, ctype: str) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", f"{ctype}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.split("?")[0] in ("/", "/index.html"):
            self._send(200, render_page(self.asker), "text/html")
        else:
            self._send(404, json.dumps({"error": f"no page {self.path}: open / or POST /api/ask"}),
                       "application/json")

    def _body(self, limit: int) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length")
        try:
            n = int(length)
        except ValueError:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}") from None
        if n > limit:  # refused without keeping it: a huge upload never reaches memory
            self._discard(n)
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the upload is {n / 2**20:.1f} MB; an image may be at most "
                               f"{MAX_IMAGE_BYTES // 2**20} MB")
        return self.rfile.read(n)

    def _discard(self, n: int) -> None:
        """Read and drop an over-large body, so the client (still sending) gets the 413 and not a reset."""
        self.close_connection = True
        if n > DRAIN_LIMIT_BYTES:
            return
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 20))
            if not chunk:
                return
            n -= len(chunk)

    def _fields(self) -> dict[str, Any]:
        ctype = self.headers.get("Content-Type", "")
        if ctype.startswith("multipart/form-data"):
            return parse_multipart(ctype, self._body(MAX_BODY_BYTES))
        if ctype.startswith("application/json"):
            try:
                doc = json.loads(self._body(MAX_JSON_BODY_BYTES))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {e}") from None
            if not isinstance(doc, dict):
                raise RequestError(HTTPStatus.BAD_REQUEST, "send a JSON object {image_base64, question}")
            return doc
        raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                           "send multipart/form-data (image, question) or JSON {image_base64, question}")

    def _send_error_line(self, status: int, message: str, page: bool, question: str = "") -> None:
        """One line for the user: on the page (with the question kept) or as JSON {"error": ...}."""
        if page:
            self._send(status, render_page(self.asker, error=message, question=question), "text/html")
        else:
            self._send(status, json.dumps({"error": message}), "application/json")

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?")[0]
        page = path in ("/", "/index.html")
        if not page and path != "/api/ask":
            self._send(404, json.dumps({"error": f"no endpoint {self.path}: POST /api/ask"}), "application/json")
            return
        question = ""
        try:
            fields = self._fields()
            question = fields.get("question") if isinstance(fields.get("question"), str) else ""
            image, question, top = _form_inputs(fields)
            with self.lock:
                answer = self.asker.ask(image, question, top=top)
        except (RequestError, AskError) as e:
            status = e.status if isinstance(e, RequestError) else HTTPStatus.BAD_REQUEST
            self._send_error_line(status, str(e).splitlines()[0], page, question)
            return
        except Exception as e:  # a bug: one line for the user, not a traceback on their screen
            self._send_error_line(500, f"the model failed on this input ({type(e).__name__}: {_error_line(e)})",
                                  page)
            return
        if page:
            self._send(200, render_page(self.asker, answer, image, question=question), "text/html")
        else:
            self._send(200, json.dumps({"answers": [answer.to_dict()]}), "application/json")


def make_handler(asker: Asker) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to `asker` (one model, one question at a time)."""
    return type("Handler", (AskHandler,), {"asker": asker, "lock": threading.Lock()})


def make_server(asker: Asker, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server for the page (not started: call serve_forever()); port 0 picks a free port."""
    server = ThreadingHTTPServer((host, port), make_handler(asker))
    server.daemon_threads = True
    return server
