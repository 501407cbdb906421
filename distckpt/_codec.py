"""Per-chunk compression of stored leaves (format version 2): zstd, off by default.

A compressed chunk is stored as one zstd frame of the chunk's raw bytes; its
crc32c in the manifest covers the stored (compressed) bytes, so damage is
caught before decompression, and the decompressed size must equal the
chunk's box.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CODECS = ("zstd",)


def check(name: str | None, level: int) -> None:
    if name is None:
        return
    if name not in CODECS:
        raise ValueError(f"compression must be None or one of {CODECS}, got {name!r}")
    if not 1 <= level <= 22:
        raise ValueError(f"compression_level for zstd must be in 1..22, got {level}")
    _zstd()


def compressor(name: str, level: int) -> Callable[[memoryview], bytes]:
    """A compress function for one thread (zstd contexts are not shared between threads)."""
    ctx = _zstd().ZstdCompressor(level=level)
    return ctx.compress


def decompress(name: str, data: np.ndarray, nbytes: int) -> np.ndarray:
    """The raw bytes of a stored chunk; ValueError if they are not ``nbytes`` long."""
    if name not in CODECS:
        raise ValueError(f"unknown compression {name!r}")
    zstd = _zstd()
    try:
        # numpy's stubs give ndarray __buffer__ only on Python >= 3.12 (mypy checks 3.11)
        view = memoryview(data)  # type: ignore[arg-type]
        raw = zstd.ZstdDecompressor().decompress(view, max_output_size=nbytes)
    except zstd.ZstdError as e:
        raise ValueError(f"zstd could not decompress it: {e}") from e
    if len(raw) != nbytes:
        raise ValueError(f"decompressed to {len(raw)} bytes, its box holds {nbytes}")
    return np.frombuffer(raw, np.uint8)


def _zstd():
    try:
        import zstandard
    except ImportError as e:  # pragma: no cover - a dependency of distckpt
        raise ImportError(
            "zstd compression needs the zstandard package: pip install zstandard"
        ) from e
    return zstandard
