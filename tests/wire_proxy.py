"""A recording, optionally enforcing, HTTP proxy on loopback in front of an object store.

The emulators do not enforce GCS's ``ifGenerationMatch`` (fake-gcs-server
and gcp-storage-emulator both let a second create-only upload replace the
first), so they cannot show that a commit is atomic. This proxy sits
between TensorStore and the emulator (``TENSORSTORE_GCS_HTTP_URL`` or the
S3 endpoint point at it) and

* records every request: method, path, query, headers, and the status
  answered (:attr:`WireProxy.records`); :meth:`WireProxy.commits` gives the
  writes of ``manifest.json``, to check that each carries its precondition;
* with ``enforce=True``, checks each conditional write of ``manifest.json``
  against the object upstream and answers 412 Precondition Failed itself
  when the condition does not hold, as real GCS and S3 do. The check and
  the forwarded write hold one lock, so no other commit through this proxy
  can come between them;
* with ``hold_commits=n``, holds writes of ``manifest.json`` until ``n``
  have arrived, then lets them through one at a time: saves racing to
  commit one location all pass their preflight before any commits, without
  any timing;
* with ``lose_answers=n``, forwards the first ``n`` writes of
  ``manifest.json`` and then closes the connection instead of answering, as
  a network that fails after the store has committed: the client retries a
  write that has landed.

Loopback only, test code only: one thread per connection (the standard
library's ThreadingHTTPServer), bodies read whole.
"""

from __future__ import annotations

import http.client
import http.server
import json
import threading
import urllib.parse
from dataclasses import dataclass, field

COMMIT_KEY = "manifest.json"
# Hop-by-hop headers (RFC 9110 7.6.1) and the framing this proxy redoes.
_NOT_FORWARDED = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "content-length",
}


@dataclass
class Record:
    """One request as the proxy saw it, and what was answered."""

    method: str
    path: str  # without the query
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    status: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    refused: bool = False  # answered 412 by the proxy, not forwarded
    answer_lost: bool = False  # forwarded, then the connection closed unanswered

    @property
    def object_name(self) -> str:
        """The object key the request names ("" if none): GCS's ``name=`` or the S3 path."""
        if "name" in self.query:  # GCS upload: /upload/storage/v1/b/<bucket>/o?name=<key>
            return self.query["name"]
        if "/o/" in self.path:  # GCS object: /storage/v1/b/<bucket>/o/<key>
            return urllib.parse.unquote(self.path.split("/o/", 1)[1])
        parts = urllib.parse.unquote(self.path).lstrip("/").split("/", 1)  # S3: /<bucket>/<key>
        return parts[1] if len(parts) == 2 else ""

    @property
    def is_commit(self) -> bool:
        """A write (not a delete) of a ``manifest.json``."""
        return self.method in ("POST", "PUT") and self.object_name.endswith(COMMIT_KEY)


class WireProxy:
    """``WireProxy(upstream, flavor="gcs"|"s3")``; ``.url`` is where clients go."""

    def __init__(
        self,
        upstream: str,
        *,
        flavor: str,
        enforce: bool = False,
        hold_commits: int = 0,
        hold_timeout_s: float = 30.0,
        lose_answers: int = 0,
    ):
        if flavor not in ("gcs", "s3"):
            raise ValueError(f"flavor must be 'gcs' or 's3', got {flavor!r}")
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"the proxy forwards to loopback only, not {upstream!r}")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.flavor, self.enforce = flavor, enforce
        self.records: list[Record] = []
        self._lock = threading.Lock()  # records, and one commit at a time
        self._commit_lock = threading.Lock()
        self._hold = threading.Barrier(hold_commits) if hold_commits > 1 else None
        self._hold_timeout_s = hold_timeout_s
        self._lose_answers = lose_answers
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> WireProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._hold is not None:
            self._hold.abort()  # a held commit fails rather than waits out its timeout
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> WireProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def commits(self) -> list[Record]:
        with self._lock:
            return [r for r in self.records if r.is_commit]

    def precondition(self, r: Record) -> str | None:
        """The commit condition a request carries, as sent; None if it carries none.

        GCS: ``ifGenerationMatch=<n>`` (0: create-only). S3: ``If-None-Match: *``
        (create-only) or ``If-Match: <etag>``.
        """
        if self.flavor == "gcs":
            gen = r.query.get("ifGenerationMatch")
            return None if gen is None else f"ifGenerationMatch={gen}"
        for name in ("if-none-match", "if-match"):
            if name in r.headers:
                return f"{name}: {r.headers[name]}"
        return None

    # ------------------------------------------------------------------ upstream

    def _request(self, method: str, target: str, body: bytes | None, headers: dict[str, str]):
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            conn.request(method, target, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def _current(self, r: Record) -> str | None:
        """What the object a commit names is upstream now: its generation
        (GCS) or ETag (S3), or None if it does not exist."""
        key = urllib.parse.quote(r.object_name, safe="")
        if self.flavor == "gcs":
            bucket = r.path.split("/b/", 1)[1].split("/", 1)[0]
            status, _, body = self._request("GET", f"/storage/v1/b/{bucket}/o/{key}", None, {})
            return str(json.loads(body)["generation"]) if status == 200 else None
        # moto wants a request signed by a known key but does not check the
        # signature: the commit's own Authorization header will do.
        auth = {"Authorization": r.headers.get("authorization", "")}
        status, headers, _ = self._request("HEAD", r.path, None, auth)
        return dict((k.lower(), v) for k, v in headers).get("etag") if status == 200 else None

    def _condition_holds(self, r: Record) -> bool:
        now = self._current(r)
        if self.flavor == "gcs":
            gen = r.query.get("ifGenerationMatch")
            return gen is None or gen == (now or "0")
        if r.headers.get("if-none-match") == "*" and now is not None:
            return False
        expected = r.headers.get("if-match")
        return expected is None or expected == now

    def _refusal(self) -> tuple[int, list[tuple[str, str]], bytes]:
        if self.flavor == "gcs":
            body = json.dumps(
                {"error": {"code": 412, "message": "conditionNotMet (wire_proxy)"}}
            ).encode()
            return 412, [("Content-Type", "application/json")], body
        body = (
            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>PreconditionFailed</Code>'
            b"<Message>At least one of the pre-conditions you specified did not hold"
            b" (wire_proxy)</Message></Error>"
        )
        return 412, [("Content-Type", "application/xml")], body

    def handle(self, r: Record, target: str, body: bytes) -> tuple[int, list, bytes]:
        with self._lock:
            self.records.append(r)
        headers = {k: v for k, v in r.headers.items() if k not in _NOT_FORWARDED}
        if not r.is_commit:
            return self._request(r.method, target, body, headers)
        if self._hold is not None:
            self._hold.wait(self._hold_timeout_s)  # BrokenBarrierError if the others never come
        with self._commit_lock:
            if self.enforce and not self._condition_holds(r):
                r.refused = True
                return self._refusal()
            answer = self._request(r.method, target, body, headers)
            if self._lose_answers > 0:
                self._lose_answers -= 1
                r.answer_lost = True
            return answer


def _handler(proxy: WireProxy) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue answered for us

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _relay(self) -> None:
            split = urllib.parse.urlsplit(self.path)
            record = Record(
                method=self.command,
                path=split.path,
                query=dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True)),
                headers={k.lower(): v for k, v in self.headers.items()},
            )
            body = self._body()
            try:
                status, headers, payload = proxy.handle(record, self.path, body)
            except (OSError, threading.BrokenBarrierError) as e:
                status, headers = 502, [("Content-Type", "text/plain")]
                payload = f"wire_proxy: {e!r}".encode()
            record.status = status
            if record.answer_lost:
                self.close_connection = True
                return
            record.response_headers = {k.lower(): v for k, v in headers}
            self.send_response(status)
            for k, v in headers:
                if k.lower() not in _NOT_FORWARDED:
                    self.send_header(k, v)
            length = record.response_headers.get("content-length", "0")
            self.send_header(
                "Content-Length", length if self.command == "HEAD" else str(len(payload))
            )
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        def log_message(self, format: str, *args: object) -> None:
            pass  # the records are the log

    return Handler
