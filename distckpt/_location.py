"""Checkpoint locations: what a ``directory`` argument names, built in one place.

A location is one of

* a filesystem path (``str`` or ``os.PathLike``; ``file://`` is stripped):
  POSIX storage, the fast path;
* ``s3://bucket/prefix``: TensorStore's ``s3`` kvstore;
* ``gs://bucket/prefix``: TensorStore's ``gcs`` kvstore;
* ``memory://name``: TensorStore's ``memory`` kvstore (one process; tests);
* a TensorStore kvstore spec (a ``dict``), used as given.

Credentials come from where the drivers look (AWS_* variables, ~/.aws,
instance metadata; Google application default credentials). A GCS
emulator or private endpoint is set with TensorStore's own
``TENSORSTORE_GCS_HTTP_URL``; the gcs driver needs no option for real
conditional writes (it always sends ``ifGenerationMatch``). Settings read
here, from the environment (see docs/storage.md):

* ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``: endpoint of an
  S3-compatible store (MinIO, Ceph, moto), as for boto3;
* ``AWS_REGION`` or ``AWS_DEFAULT_REGION``: the bucket's region (else the
  driver asks the endpoint);
* ``DISTCKPT_S3_CONDITIONAL_WRITE`` (default ``1``): send real conditional
  PUTs (``If-None-Match``/``If-Match``). ``0`` lets TensorStore emulate them
  with a HEAD before an unconditional PUT, which is not atomic: only for
  stores that reject conditional PUTs;
* ``DISTCKPT_STORAGE_RETRIES``: how many times an object-store request is
  retried before ``StorageUnavailableError`` (TensorStore's default: 32,
  with backoff up to 32 s each);
* ``DISTCKPT_STORAGE_RETRY_DELAY_S``: the first backoff delay (default 1 s).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, TypeAlias

from distckpt import _knobs

OBJECT_DRIVERS = ("s3", "gcs")

Location: TypeAlias = str | os.PathLike[str] | dict[str, Any]
"""What a public ``directory`` (``src``, ``dst``, ``backup_to``) argument may be:
a filesystem path, an ``s3://``, ``gs://`` or ``memory://`` URL, or a
TensorStore kvstore spec."""


@dataclass(frozen=True)
class ParsedLocation:
    """A parsed location: a local path, or a kvstore spec with a display name."""

    display: str
    path: str | None = None  # a local filesystem path (POSIX storage)
    spec: dict[str, Any] | None = None  # a TensorStore kvstore spec

    @property
    def driver(self) -> str:
        return "posix" if self.spec is None else str(self.spec.get("driver"))

    @property
    def is_object_store(self) -> bool:
        return self.driver in OBJECT_DRIVERS

    def child(self, name: str) -> ParsedLocation:
        """The location of ``name`` inside this one (a manager's step)."""
        if self.spec is None:
            assert self.path is not None  # parse() sets one of path and spec
            return ParsedLocation(os.path.join(self.path, name), path=os.path.join(self.path, name))
        spec = copy.deepcopy(self.spec)
        spec["path"] = _dir_path(spec.get("path", "")) + name + "/"
        return ParsedLocation(f"{self.display.rstrip('/')}/{name}", spec=spec)


def _nonempty(path: str, given: str | None = None) -> str:
    # An empty path would silently mean the current directory.
    if not path.strip():
        raise ValueError(
            f"checkpoint location {given if given is not None else path!r} is empty; pass a "
            "directory path (it is created if needed), an s3:// or gs:// URL, or memory://name"
        )
    return path


def parse(location: Location | ParsedLocation) -> ParsedLocation:
    """Turns a ``directory`` argument (a :data:`Location`) into a :class:`ParsedLocation`.

    Raises:
      TypeError: not a path, URL or dict.
      ValueError: an empty path, an unknown scheme, or a URL without a bucket.
    """
    if isinstance(location, ParsedLocation):
        return location
    if isinstance(location, dict):
        if "driver" not in location:
            raise ValueError(
                f"a kvstore spec needs a 'driver' member, got {location!r}; e.g. "
                '{"driver": "s3", "bucket": "my-bucket", "path": "ckpt/"}'
            )
        spec = copy.deepcopy(location)
        if spec["driver"] == "s3":
            spec.setdefault("use_conditional_write", _s3_conditional_write())
        return ParsedLocation(_display(spec), spec=spec)
    if isinstance(location, os.PathLike):
        location = os.fspath(location)
    if not isinstance(location, str):
        raise TypeError(
            f"a checkpoint location must be a path, an s3:// or gs:// URL, memory://name "
            f"or a TensorStore kvstore spec (dict), got {location!r}"
        )
    if "://" not in location:
        return ParsedLocation(os.path.abspath(_nonempty(location)), path=os.path.abspath(location))
    scheme, rest = location.split("://", 1)
    if scheme == "file":
        _nonempty(rest, location)
        return ParsedLocation(os.path.abspath(rest), path=os.path.abspath(rest))
    if scheme == "memory":
        return ParsedLocation(location, spec={"driver": "memory", "path": _dir_path(rest)})
    if scheme in ("s3", "gs"):
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"{location!r} names no bucket; write {scheme}://bucket/prefix")
        return ParsedLocation(
            f"{scheme}://{bucket}/{prefix.strip('/')}", spec=_bucket_spec(scheme, bucket, prefix)
        )
    raise ValueError(
        f"{location!r}: the {scheme}:// scheme is not supported; use a filesystem path, "
        "s3://bucket/prefix, gs://bucket/prefix, memory://name or a TensorStore kvstore spec dict"
    )


def _bucket_spec(scheme: str, bucket: str, prefix: str) -> dict:
    if scheme == "gs":
        return {"driver": "gcs", "bucket": bucket, "path": _dir_path(prefix)}
    spec: dict = {"driver": "s3", "bucket": bucket, "path": _dir_path(prefix)}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        spec["endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    spec["use_conditional_write"] = _s3_conditional_write()
    return spec


def _s3_conditional_write() -> bool:
    return bool(_knobs.get("s3_conditional_write"))


def _dir_path(path: str) -> str:
    """A key prefix that ends with one ``/`` (or is empty: the bucket's root)."""
    path = path.strip("/")
    return path + "/" if path else ""


def _display(spec: dict) -> str:
    driver, path = spec.get("driver"), str(spec.get("path", "")).strip("/")
    if driver == "s3" and "bucket" in spec:
        return f"s3://{spec['bucket']}/{path}"
    if driver == "gcs" and "bucket" in spec:
        return f"gs://{spec['bucket']}/{path}"
    if driver == "memory":
        return f"memory://{path}"
    return str(spec)


def context_spec() -> dict:
    """TensorStore context resources for every kvstore this process opens."""
    out: dict = {}
    retries = _knobs.get("storage_retries")
    delay = _knobs.get("storage_retry_delay_s")
    if retries is None and delay is None:
        return out
    policy: dict = {}
    if retries is not None:
        policy["max_retries"] = retries
    if delay is not None:
        policy["initial_delay"] = f"{delay * 1000:.0f}ms"
        policy["max_delay"] = f"{delay * 8 * 1000:.0f}ms"
    return {"s3_request_retries": policy, "gcs_request_retries": policy}
