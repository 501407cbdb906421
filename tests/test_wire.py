"""The commit precondition on the wire, for GCS and S3 (tests/wire_proxy.py).

Each test puts a recording, enforcing proxy on loopback between
TensorStore and the emulator (fake-gcs-server, tests/gcs.py; moto,
tests/s3.py) and checks what distckpt sends when it commits: every write
of ``manifest.json`` carries its precondition (GCS ``ifGenerationMatch``,
S3 ``If-None-Match``/``If-Match``). The proxy answers 412 when the
precondition does not hold, as the real stores do and fake-gcs-server does
not, so the race between two jobs is decided as on a real bucket.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

import numpy as np
import pytest

import distckpt
from distckpt.errors import CheckpointExistsError
from tests import gcs as _gcs
from tests import s3 as _s3
from tests.mp import WorkerResult, run_processes
from tests.wire_proxy import WireProxy

gcs_server = _gcs.gcs_server
s3_server = _s3.s3_server

HERE = "tests.test_wire"
CREATE_ONLY = {"gcs": "ifGenerationMatch=0", "s3": "if-none-match: *"}


@dataclass
class Wire:
    """A fresh bucket on one store, and a proxy in front of that store."""

    store: str  # "gcs" or "s3"
    server: object  # GcsServer or S3Server: the store itself, not through the proxy
    bucket: str
    proxy: WireProxy

    @property
    def url(self) -> str:
        return f"{'gs' if self.store == 'gcs' else 's3'}://{self.bucket}/ckpt"

    @property
    def env(self) -> dict[str, str]:
        """What sends a process's requests through the proxy."""
        name = "TENSORSTORE_GCS_HTTP_URL" if self.store == "gcs" else "AWS_ENDPOINT_URL_S3"
        return {**self.server.env, name: self.proxy.url}

    def generation(self, key: str) -> str | None:
        """The object's generation (GCS) or ETag (S3), as the store has it now."""
        if self.store == "gcs":
            return self.server.generation(self.bucket, key)
        return self.server.client().head_object(Bucket=self.bucket, Key=key)["ETag"]

    def condition(self, generation: str) -> str:
        """What a commit over ``generation`` must send."""
        return (
            f"ifGenerationMatch={generation}" if self.store == "gcs" else f"if-match: {generation}"
        )


def _wire(request, **proxy_options):
    store = request.param
    server = request.getfixturevalue(f"{store}_server")
    bucket = f"w-{uuid.uuid4().hex[:12]}"
    if store == "gcs":
        server.create_bucket(bucket)
    else:
        server.client().create_bucket(Bucket=bucket)
    return Wire(store, server, bucket, WireProxy(server.endpoint, flavor=store, **proxy_options))


@pytest.fixture(params=["gcs", "s3"])
def wire(request, monkeypatch):
    """This process's requests go through an enforcing proxy."""
    w = _wire(request, enforce=True)
    with w.proxy:
        for k, v in w.env.items():
            monkeypatch.setenv(k, v)
        yield w


def _tree(who: str) -> dict:
    return {"w": np.arange(64, dtype=np.float32), "who": who}


def test_every_commit_carries_its_precondition(wire):
    url, prefix = wire.url, "ckpt"
    distckpt.save(url + "/c", _tree("first"))
    before = wire.generation(f"{prefix}/c/manifest.json")
    with pytest.raises(CheckpointExistsError, match="already exists"):
        distckpt.save(url + "/c", _tree("refused"))  # at preflight: no commit sent
    distckpt.save(url + "/c", _tree("second"), overwrite=True)
    with distckpt.CheckpointManager(url + "/run", max_to_keep=2) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _tree(str(step)), blocking=True)
    distckpt.copy(url + "/c", url + "/copied")

    commits = wire.proxy.commits()
    sent = [(c.object_name.removeprefix(prefix + "/"), wire.proxy.precondition(c)) for c in commits]
    create_only = CREATE_ONLY[wire.store]
    assert sent == [
        ("c/manifest.json", create_only),
        ("c/manifest.json", wire.condition(before)),
        ("run/step_00000001/manifest.json", create_only),
        ("run/step_00000002/manifest.json", create_only),
        ("run/step_00000003/manifest.json", create_only),
        ("copied/manifest.json", create_only),
    ]
    assert [c.status for c in commits] == [200] * len(commits)
    assert distckpt.restore(url + "/c")["who"] == "second"


def _w_race(url: str, who: str) -> dict:
    """One job of two: a create-only save to ``a``, an overwriting one to ``b``."""
    out = {}
    for name, overwrite in (("a", False), ("b", True)):
        try:
            distckpt.save(f"{url}/{name}", _tree(who), overwrite=overwrite)
            out[name] = "committed"
        except CheckpointExistsError as e:
            out[name] = str(e)
    return out


@pytest.fixture(params=["gcs", "s3"])
def racing_wire(request):
    """The proxy holds commits until two have come, then decides them one at a time."""
    w = _wire(request, enforce=True, hold_commits=2)
    with w.proxy:
        yield w


@pytest.mark.multiprocess
def test_concurrent_commits_from_two_jobs_have_one_winner(racing_wire):
    """Two jobs save to one location at once, create-only and then over a
    checkpoint both saw at preflight. The proxy lets each commit through only
    once both have sent theirs: both preflights came first. Exactly one wins
    each race; the other gets CheckpointExistsError and its data is gone."""
    wire = racing_wire
    url = wire.url
    distckpt.save(url + "/b", _tree("before"))  # this process goes to the store directly
    before = wire.generation("ckpt/b/manifest.json")

    results: dict[str, list[WorkerResult]] = {}

    def job(who: str) -> None:
        results[who] = run_processes(
            f"{HERE}:_w_race", 1, 1, args={"url": url, "who": who}, env=wire.env
        )

    threads = [threading.Thread(target=job, args=(who,)) for who in ("J1", "J2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcomes = {who: results[who][0].value for who in ("J1", "J2")}

    lost = {"a": "appeared while this save was writing", "b": "was replaced by another save"}
    for name in ("a", "b"):
        winners = [who for who, out in outcomes.items() if out[name] == "committed"]
        assert len(winners) == 1, outcomes
        [loser] = [who for who in outcomes if who not in winners]
        assert lost[name] in outcomes[loser][name] and "manifest.json" in outcomes[loser][name]
        assert distckpt.restore(f"{url}/{name}")["who"] == winners[0]
        assert distckpt.verify(f"{url}/{name}").leaves == 2
        prefix = f"ckpt/{name}/"
        attempts = {
            k.split("/")[2] for k in _keys(wire, prefix) if k.split("/")[2].startswith("attempt-")
        }
        assert len(attempts) == 1, attempts  # the loser's data and the replaced data are gone

    commits = wire.proxy.commits()
    expected = {"a": CREATE_ONLY[wire.store], "b": wire.condition(before)}
    for name in ("a", "b"):
        mine = [c for c in commits if c.object_name == f"ckpt/{name}/manifest.json"]
        assert [wire.proxy.precondition(c) for c in mine] == [expected[name]] * 2
        assert sorted((c.status, c.refused) for c in mine) == [(200, False), (412, True)]


def _keys(wire: Wire, prefix: str) -> list[str]:
    return wire.server.keys(wire.bucket, prefix)


@pytest.fixture(params=["gcs", "s3"])
def lossy_wire(request, monkeypatch):
    """The answer to the first commit is lost after the store has taken it."""
    w = _wire(request, enforce=True, lose_answers=1)
    with w.proxy:
        for k, v in w.env.items():
            monkeypatch.setenv(k, v)
        yield w


def test_a_commit_whose_answer_was_lost_stands(lossy_wire):
    """TensorStore retries the commit; the retry fails its precondition, since
    the first try landed. distckpt finds its own manifest there and reports
    the save committed, not CheckpointExistsError."""
    wire = lossy_wire
    distckpt.save(wire.url + "/c", _tree("mine"))
    [first, retry] = wire.proxy.commits()
    assert first.answer_lost and first.status == 200
    assert retry.refused and retry.status == 412
    assert wire.proxy.precondition(retry) == CREATE_ONLY[wire.store]
    assert distckpt.restore(wire.url + "/c")["who"] == "mine"
    assert distckpt.verify(wire.url + "/c").leaves == 2
