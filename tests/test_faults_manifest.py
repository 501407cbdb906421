"""A damaged or hostile manifest.json (docs/reliability.md, case 10).

Damage without a valid checksum is caught by the manifest's own CRC-32C.
"Crafted" manifests below are re-sealed with a correct checksum, as a
hostile or buggy writer could, so that the checks behind the checksum are
exercised too: names that would leave the checkpoint directory, absurd
shapes, dtypes that are not data. Every case must raise a clear
``CorruptCheckpointError`` naming the manifest, read nothing outside the
checkpoint, write nothing, and run no code from it.
"""

from __future__ import annotations

import json
import os
import shutil

import crc32c
import numpy as np
import pytest

import distckpt
from distckpt import _manifest
from distckpt.errors import CorruptCheckpointError
from tests import indexes

READERS = {
    "metadata": distckpt.metadata,
    "verify": distckpt.verify,
    "restore": distckpt.restore,
}
PWNED = "pwned-marker"  # a file the "code" in hostile manifests would create


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest") / "c"
    distckpt.save(
        root,
        {
            "w": np.arange(12, dtype=np.float32).reshape(3, 4),
            "k": np.arange(5, dtype=np.int64),
            "step": 3,
        },
    )
    return root


def _seal(doc: dict) -> bytes:
    """What a writer that knows the format produces (docs/format.md, Checksums)."""
    doc = {k: v for k, v in doc.items() if k != "manifest_crc32c"}
    body = json.dumps(doc, separators=(",", ":")).encode()
    return body[:-1] + b',"manifest_crc32c":' + str(crc32c.crc32c(body)).encode() + b"}"


def _snapshot(root) -> dict:
    """Every file under ``root`` with its size, mtime and content hash."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            st = os.stat(p)
            with open(p, "rb") as fh:
                out[p] = (st.st_size, st.st_mtime_ns, crc32c.crc32c(fh.read()))
    return out


def _expect_refused(work, *, match: str) -> None:
    """Every reader refuses ``work`` with a CorruptCheckpointError naming its manifest,
    and nothing anywhere under the test's directory changes."""
    sandbox = os.path.dirname(work)
    before = _snapshot(sandbox)
    for name, read in READERS.items():
        with pytest.raises(CorruptCheckpointError, match=match) as info:
            read(work)
        assert "manifest.json" in str(info.value), (name, str(info.value))
    assert _snapshot(sandbox) == before, "a reader wrote something"
    assert not os.path.exists(os.path.join(sandbox, PWNED))


def _copy(original, tmp_path):
    work = tmp_path / "c"
    shutil.copytree(original, work)
    return work


def _edit(work, change) -> None:
    path = work / "manifest.json"
    doc = json.loads(path.read_bytes())
    change(doc, work)
    path.write_bytes(_seal(doc))


def _leaf(doc: dict, name: str) -> dict:
    return next(e for e in doc["leaves"] if e["path"] == [["key", name]])


# --------------------------------------------------------------------------- damage


@pytest.mark.parametrize("keep", [0, 1, 10, 100, -1])
def test_truncated(original, tmp_path, keep):
    work = _copy(original, tmp_path)
    raw = (work / "manifest.json").read_bytes()
    (work / "manifest.json").write_bytes(raw[:keep])
    _expect_refused(work, match="not a readable distckpt manifest")


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"not json", b"[]", b"null", b'{"format": "distckpt"}', b"\x00" * 64],
    ids=["empty", "brace", "text", "list", "null", "stub", "zeros"],
)
def test_invalid_json(original, tmp_path, raw):
    work = _copy(original, tmp_path)
    (work / "manifest.json").write_bytes(raw)
    _expect_refused(work, match="not a readable distckpt manifest")


def test_edited_without_a_new_checksum(original, tmp_path):
    work = _copy(original, tmp_path)
    raw = (work / "manifest.json").read_bytes()
    (work / "manifest.json").write_bytes(raw.replace(b'"value":3', b'"value":4'))
    _expect_refused(work, match="checksum does not match")


@pytest.mark.parametrize("version", [_manifest.FORMAT_VERSION + 1, 99, 0, -1, "1", None, 1.5])
def test_wrong_format_version(original, tmp_path, version):
    work = _copy(original, tmp_path)
    _edit(work, lambda doc, _: doc.update(format_version=version))
    if isinstance(version, int) and version > _manifest.FORMAT_VERSION:
        match = f"format version {version}, newer than this distckpt reads.*Upgrade"
    else:
        match = "format_version|not a readable"
    _expect_refused(work, match=match)


def test_not_a_distckpt_manifest(original, tmp_path):
    work = _copy(original, tmp_path)
    _edit(work, lambda doc, _: doc.update(format="orbax"))
    _expect_refused(work, match="format is 'orbax'")


# --------------------------------------------------------------------------- escapes


def test_attempt_outside_the_checkpoint_is_never_read(original, tmp_path):
    """The manifest points its attempt at a valid copy of the data outside
    the checkpoint: had it been read, the restore would have succeeded."""

    def escape(doc, work):
        shutil.copytree(work / doc["attempt"], tmp_path / "outside")
        doc["attempt"] = "../outside"

    work = _copy(original, tmp_path)
    _edit(work, escape)
    _expect_refused(work, match=r"attempt '\.\./outside' is not an attempt directory")


@pytest.mark.parametrize(
    "name",
    ["../../stolen.bin", "/etc/hostname", "..", "sub/p00000.s000.bin", "", "a\\b"],
)
def test_data_file_outside_the_attempt_is_never_read(original, tmp_path, name):
    def escape(doc, work):
        real = work / doc["attempt"] / doc["files"][0]["name"]
        shutil.copy(real, tmp_path / "stolen.bin")  # valid bytes, were they read
        doc["files"][0]["name"] = name

    work = _copy(original, tmp_path)
    _edit(work, escape)
    _expect_refused(work, match="is not a plain file name inside the attempt")


def test_key_paths_never_name_files(original, tmp_path):
    """Leaf key paths are dict keys, not paths: ``../`` in one reads and
    writes nothing outside, and the value comes back under that key."""
    work = _copy(original, tmp_path)

    def rename(doc, _):
        _leaf(doc, "w")["path"] = [["key", "../../escape"], ["key", "/etc/passwd"]]
        root = doc["structure"][0]  # the record of containers says the same
        slot = root[3].index(["key", "w"])
        root[3][slot] = ["key", "../../escape"]
        doc["structure"].append([0, slot, "dict", [["key", "/etc/passwd"]]])

    _edit(work, rename)
    before = _snapshot(tmp_path)
    distckpt.verify(work)
    out = distckpt.restore(work)
    np.testing.assert_array_equal(
        out["../../escape"]["/etc/passwd"], np.arange(12, dtype=np.float32).reshape(3, 4)
    )
    # A save over it writes inside the checkpoint only.
    distckpt.save(work, {"x": np.zeros(2)}, overwrite=True)
    after = _snapshot(tmp_path)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert all(p.startswith(str(work) + os.sep) for p in changed), changed
    assert not (tmp_path.parent / "escape").exists()


# --------------------------------------------------------------------------- absurd values


ABSURD = {
    "huge": ("w", {"shape": [10**12, 10**12]}, "absurd"),
    "overflow": ("w", {"shape": [2**40] * 4}, "absurd"),
    "negative": ("w", {"shape": [-3, 4]}, "is not a list of sizes"),
    "string": ("w", {"shape": ["3", 4]}, "is not a list of sizes"),
    "float": ("w", {"shape": [3.0, 4]}, "is not a list of sizes"),
    "bool": ("w", {"shape": [True, 4]}, "is not a list of sizes"),
    "dtype-code": ("w", {"dtype": f"__import__('os').system('touch {PWNED}')"}, "unknown dtype"),
    "dtype-object": ("w", {"dtype": "object"}, "unknown dtype"),
    "dtype-null": ("w", {"dtype": None}, "unknown dtype"),  # np_dtype(None) is float64
    "kind": ("w", {"kind": "pickle"}, "unknown leaf kind"),
}


@pytest.mark.parametrize("case", list(ABSURD))
def test_absurd_leaf(original, tmp_path, case, monkeypatch):
    leaf, fields, match = ABSURD[case]
    monkeypatch.chdir(tmp_path)  # where "touch" would write
    work = _copy(original, tmp_path)
    _edit(work, lambda doc, _: _leaf(doc, leaf).update(fields))
    _expect_refused(work, match=match)
    assert not (tmp_path / PWNED).exists()


# A chunk index (format 3) is covered by the crc32c the commit record holds;
# these are re-sealed so that the checks behind that checksum are exercised.
def _first_of_w(records, **change):
    at = next(i for i, c in enumerate(records) if c.box and len(c.box) == 2)
    return [*records[:at], records[at]._replace(**change), *records[at + 1 :]]


CHUNKS = {
    "past-the-end": ({"offset": 10**9}, "past the end of the file"),
    "wrapping-offset": ({"offset": 2**64 - 8}, "past the end of the file"),
    "wrapping-size": ({"nbytes": 2**64 - 48}, "past the end of the file"),
    "inverted-box": ({"box": ((3, 0), (0, 4))}, "empty or inverted chunk box"),
    "short-box": ({"box": ((0, 3),)}, "do not match the ranks"),
    "outside-box": ({"box": ((0, 3), (0, 400))}, "outside its cell"),
}


def _expect_index_refused(work, *, match: str) -> None:
    """Readers of data refuse a damaged index, naming it; metadata never reads one."""
    sandbox = os.path.dirname(work)
    before = _snapshot(sandbox)
    distckpt.metadata(work)
    for read in (distckpt.verify, distckpt.restore):
        with pytest.raises(CorruptCheckpointError, match=match) as info:
            read(work)
        assert "p00000.idx" in str(info.value), str(info.value)
    assert _snapshot(sandbox) == before, "a reader wrote something"


@pytest.mark.parametrize("case", list(CHUNKS))
def test_absurd_chunk(original, tmp_path, case):
    change, match = CHUNKS[case]
    work = _copy(original, tmp_path)
    indexes.rewrite_index(work, lambda records: _first_of_w(records, **change))
    _expect_index_refused(work, match=match)


@pytest.mark.parametrize("keep", [0, 8, 40, -1])
def test_truncated_index(original, tmp_path, keep):
    work = _copy(original, tmp_path)
    raw = indexes.index_path(work).read_bytes()
    indexes.write_raw_index(work, raw[:keep])
    _expect_index_refused(work, match="p00000.idx")


def test_index_bit_flip_is_caught_by_the_commit_records_checksum(original, tmp_path):
    work = _copy(original, tmp_path)
    path = indexes.index_path(work)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10  # in a box bound: still a decodable index
    path.write_bytes(bytes(raw))
    _expect_index_refused(work, match="fails its crc32c")


def test_missing_index(original, tmp_path):
    work = _copy(original, tmp_path)
    os.unlink(indexes.index_path(work))
    _expect_index_refused(work, match="p00000.idx")


def test_a_self_consistent_record_bigger_than_its_files_allocates_nothing(original, tmp_path):
    # 4 GiB declared in one chunk and one file, all consistent with each
    # other, but the file holds 88 bytes: refused before any allocation.
    work = _copy(original, tmp_path)
    size = 4 << 30
    shape = [1 << 20, 1 << 10]

    def grow_records(records):
        out = []
        for c in records:
            if c.box and len(c.box) == 2:  # ['w']: one chunk of 4 GiB
                out.append(c._replace(offset=0, nbytes=size, box=((0, shape[0]), (0, shape[1]))))
            else:
                out.append(c._replace(offset=size + c.offset))
        return out

    indexes.rewrite_index(work, grow_records)

    def grow(doc, _):
        leaf = _leaf(doc, "w")
        leaf["shape"] = shape
        leaf["grid"] = {"edges": shape, "owners": _leaf(doc, "k")["grid"]["owners"]}
        doc["files"][0]["bytes"] = size + 1024

    _edit(work, grow)
    with pytest.raises(CorruptCheckpointError, match=r"holds 88 bytes but chunks of"):
        distckpt.restore(work)
    with pytest.raises(CorruptCheckpointError, match="data file has .* bytes, the manifest says"):
        distckpt.verify(work)


GRIDS = {
    "owner-out-of-range": (lambda doc: doc["owners"].__setitem__(0, [7]), "names writer processes"),
    "edges-not-up-to-shape": (
        lambda doc: _leaf(doc, "w")["grid"].update(edges=[[0, 2], 4]),
        "do not run from 0",
    ),
    "too-many-cells": (lambda doc: _leaf(doc, "w")["grid"].update(edges=[1, 1]), "does not fit"),
    "no-owner-table": (lambda doc: _leaf(doc, "w")["grid"].update(owners=9), "owner table"),
    "index-of-another-name": (
        lambda doc: doc["indexes"][0].update(name="../x.idx"),
        "not the index name",
    ),
}


@pytest.mark.parametrize("case", list(GRIDS))
def test_absurd_grid(original, tmp_path, case):
    change, match = GRIDS[case]
    work = _copy(original, tmp_path)
    _edit(work, lambda doc, _: change(doc))
    _expect_refused(work, match=match)


def test_python_values_are_data_not_code(original, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    work = _copy(original, tmp_path)
    code = f"__import__('os').system('touch {PWNED}')"
    _edit(work, lambda doc, _: _leaf(doc, "step").update(value=code))
    assert distckpt.restore(work)["step"] == code  # a string, returned as a string
    assert not (tmp_path / PWNED).exists()
