from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln import oci
from kiln.errors import ImageNotFound, StoreError
from kiln.store import ImageStore


def fake_image(store: ImageStore, app: str, payload: bytes, tags: list[str]) -> str:
    layer = store.put_bytes(payload)
    manifest = oci.canonical_json({"schemaVersion": 2, "layers": [{"digest": layer}]})
    digest = store.put_bytes(manifest)
    store.add_image(digest, len(manifest), app, tags)
    return digest


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    s = ImageStore(tmp_path / "images")
    s.init()
    return s


def test_layout_is_oci(store: ImageStore) -> None:
    assert json.loads((store.root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((store.root / "index.json").read_text())
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == oci.INDEX


def test_resolve_by_digest_prefix_and_tag(store: ImageStore) -> None:
    a = fake_image(store, "web", b"a", ["latest", "v1"])
    assert store.resolve(a).digest == a
    assert store.resolve(a[7:19]).digest == a
    assert store.resolve("web:v1").digest == a
    assert store.resolve("web").digest == a  # APP alone means APP:latest


def test_unknown_references(store: ImageStore) -> None:
    a = fake_image(store, "web", b"a", ["v1"])
    with pytest.raises(ImageNotFound, match="no image tagged 'web:nope'"):
        store.resolve("web:nope")
    other = "0" * 12 if not a[7:].startswith("0" * 12) else "f" * 12
    with pytest.raises(ImageNotFound, match=f"no image '{other}'"):
        store.resolve(other)
    with pytest.raises(ImageNotFound, match="not an image reference"):
        store.resolve("abc")


def test_ambiguous_prefix(store: ImageStore) -> None:
    a = fake_image(store, "web", b"a", ["a"])
    b = fake_image(store, "web", b"b", ["b"])
    # Rewrite the index so both entries share a 12-digit prefix.
    index = json.loads((store.root / "index.json").read_text())
    fake_b = a[:-1] + ("0" if a[-1] != "0" else "1")
    for m in index["manifests"]:
        if m["digest"] == b:
            m["digest"] = fake_b
    (store.root / "index.json").write_text(json.dumps(index))
    with pytest.raises(ImageNotFound, match="ambiguous"):
        store.resolve(a[7:19])


def test_tags_move_and_old_image_stays_listed(store: ImageStore) -> None:
    a = fake_image(store, "web", b"a", ["latest"])
    b = fake_image(store, "web", b"b", ["latest"])
    records = {r.digest: r for r in store.images()}
    assert records[b].tags == ("latest",)
    assert records[a].tags == ()
    assert store.resolve("web:latest").digest == b


def test_corrupt_blob_is_refused(store: ImageStore) -> None:
    digest = store.put_bytes(b"precious")
    path = store.blob_path(digest)
    path.chmod(0o644)
    path.write_bytes(b"tampered")
    with pytest.raises(StoreError, match=f"{digest}.*corrupt"):
        store.read_bytes(digest)
    with pytest.raises(StoreError, match="corrupt"):
        store.verify_blob(digest)


def test_scratch_of_dead_process_is_swept(store: ImageStore) -> None:
    leftover = store.root / "tmp" / "999999-dead"
    leftover.mkdir(parents=True)
    (leftover / "blob.partial").write_bytes(b"x")
    store.init()
    assert not leftover.exists()


def test_state_database_from_an_older_kiln_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    from kiln.state import State

    db = sqlite3.connect(tmp_path / "state.db")
    db.execute(
        "CREATE TABLE releases (id INTEGER PRIMARY KEY, env TEXT NOT NULL, number INTEGER NOT NULL,"
        " app TEXT NOT NULL, image TEXT NOT NULL, strategy TEXT NOT NULL, state TEXT NOT NULL,"
        " weight INTEGER NOT NULL DEFAULT 0, replicas INTEGER NOT NULL, spec TEXT NOT NULL,"
        " created REAL NOT NULL, updated REAL NOT NULL, finished REAL, serving_since REAL,"
        " warm_until REAL, reason TEXT, rollback_of INTEGER, actor TEXT NOT NULL, UNIQUE (env, number))"
    )
    db.execute(
        "INSERT INTO releases (env, number, app, image, strategy, state, replicas, spec, created,"
        " updated, actor) VALUES ('prod', 1, 'a', 'sha256:x', 'blue-green', 'serving', 1, '{}', 0, 0, 'me')"
    )
    db.commit()
    db.close()
    state = State(tmp_path / "state.db")
    (release,) = state.releases()
    assert release.progress == {} and release.trail == []
    state.close()
