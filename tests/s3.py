"""A real S3 server on loopback for the object-store tests: moto's ThreadedMotoServer.

``s3_server`` (session-scoped) starts one on 127.0.0.1 with an ephemeral
port and points this process at it through the environment (endpoint,
credentials, region, NO_PROXY, short retries); ``server.env`` holds the
same variables for worker processes (``run_processes(..., env=...)``).
``s3_url`` gives each test a fresh bucket. Tests skip, saying why, if moto
or boto3 is missing or the server does not start.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

# Short retries: a test of a dead server must fail in well under a second.
RETRY_ENV = {"DISTCKPT_STORAGE_RETRIES": "2", "DISTCKPT_STORAGE_RETRY_DELAY_S": "0.05"}


@contextlib.contextmanager
def patched_environ(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``env`` set, as it was again afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]
    server: object

    def client(self, endpoint: str | None = None):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def get(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)


def start_server():
    """A started ThreadedMotoServer and its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def server_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        # A proxy variable would send loopback requests to the proxy: boto3
        # and TensorStore's curl both honour NO_PROXY / no_proxy.
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        **RETRY_ENV,
    }


@pytest.fixture(scope="session")
def s3_server():
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as e:
        pytest.skip(f"moto[server] and boto3 are needed for the S3 tests: {e}")
    try:
        server, endpoint = start_server()
    except Exception as e:  # noqa: BLE001 - any failure to start means: skip, saying why
        pytest.skip(f"moto's S3 server did not start on 127.0.0.1: {e!r}")
    env = server_env(endpoint)
    try:
        with patched_environ(env):
            yield S3Server(endpoint, env, server)
    finally:
        server.stop()


@pytest.fixture
def s3_url(s3_server) -> str:
    """``s3://<fresh bucket>/ckpt``."""
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}/ckpt"
