"""End to end: `kiln bake` and friends as a user runs them, on the example app."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kiln.store import ImageStore
from kit import KILN, git, run_kiln

pytestmark = pytest.mark.slow


def store_of(home: Path) -> ImageStore:
    return ImageStore(home / "images")


def assert_store_consistent(home: Path) -> None:
    """Every listed image and attestation is whole: all blobs present and verified."""
    store = store_of(home)
    index = json.loads((home / "images" / "index.json").read_text())
    for entry in index["manifests"]:
        manifest = store.read_json(entry["digest"])
        for blob in [manifest["config"], *manifest["layers"]]:
            store.verify_blob(blob["digest"], blob["size"])


def layers(result: dict[str, Any]) -> dict[str, str]:
    return {layer["name"]: layer["digest"] for layer in result["layers"]}


def test_bake_is_reproducible_across_homes(hello: Path, tmp_path: Path) -> None:
    first = run_kiln("bake", str(hello), "--json")
    assert first.code == 0, first.err
    result = first.json()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", result["digest"])
    assert [layer["name"] for layer in result["layers"]] == ["base", "dependencies", "app"]
    assert result["size"] == sum(layer["size"] for layer in result["layers"])
    # Another home, another checkout of the same commit: the same image, bit for bit.
    other_src = tmp_path / "elsewhere"
    shutil.copytree(hello, other_src)
    second = run_kiln("bake", str(other_src), "--json", env={"KILN_HOME": str(tmp_path / "home2")})
    assert second.code == 0, second.err
    assert second.json()["digest"] == result["digest"]


def test_no_change_is_a_cache_hit_and_code_change_rebuilds_only_the_app(hello: Path) -> None:
    first = run_kiln("bake", str(hello), "--json", "--reason", "first").json()
    again = run_kiln("bake", str(hello), "--json").json()
    assert again["digest"] == first["digest"]
    assert again["already_stored"] is True
    assert all(layer["cached"] for layer in again["layers"])

    module = hello / "hello" / "__init__.py"
    module.write_text(module.read_text().replace('"Hello"', '"Hi"'))
    git(hello, "commit", "-qam", "say hi")
    changed = run_kiln("bake", str(hello), "--json", "--reason", "say hi").json()
    assert changed["digest"] != first["digest"]
    before, after = layers(first), layers(changed)
    assert before["base"] == after["base"]
    assert before["dependencies"] == after["dependencies"]
    assert before["app"] != after["app"]
    assert changed["previous"] == first["digest"]

    diff = run_kiln("diff", first["digest"], changed["digest"], "--json")
    assert diff.code == 0, diff.err
    files = diff.json()["files"]
    assert files["changed"] == ["/app/hello/__init__.py"]
    assert files["added"] == [] and files["removed"] == []
    human = run_kiln("diff", first["digest"][7:19], "hello:latest")
    assert "~ /app/hello/__init__.py" in human.out


def test_inspect_answers_the_visibility_questions(hello: Path) -> None:
    digest = run_kiln("bake", str(hello), "--json", "--reason", "ship it", "--tag", "v1").json()[
        "digest"
    ]
    result = run_kiln("inspect", "hello:v1", "--json")
    assert result.code == 0, result.err
    info = result.json()
    head = git(hello, "rev-parse", "HEAD")
    assert info["digest"] == digest
    assert info["source"]["revision"] == head and info["source"]["dirty"] is False
    assert info["created"] == "2026-01-02T03:04:05Z"  # the commit's time, not the clock's
    assert info["build"]["reason"] == "ship it"
    assert info["build"]["host"] and info["build"]["user"] and info["build"]["at"]
    assert info["build"]["previous_image"] is None
    assert set(info["tags"]) >= {"latest", "v1"}
    assert info["base"]["name"] == "debian:bookworm" and info["base"]["digest"].startswith(
        "sha256:"
    )
    assert info["lock_digest"].startswith("sha256:")
    assert "flask" in info["sbom"]["python_packages"]
    assert info["sbom"]["debian_packages"] > 20
    assert info["run"]["command"][0] == "gunicorn" and info["run"]["user"] == "1000:1000"
    assert info["health"]["path"] == "/status"
    assert set(info["how"]) == {"start", "validate", "monitor", "update"}
    ann = info["annotations"]
    for key in ("created", "revision", "version", "title", "base.digest", "base.name"):
        assert f"org.opencontainers.image.{key}" in ann
    statement = info["provenance"]
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    assert statement["subject"][0]["digest"]["sha256"] == digest[7:]
    deps = {d["name"] for d in statement["predicate"]["buildDefinition"]["resolvedDependencies"]}
    assert {"source", "base", "lock", "flask"} <= deps
    human = run_kiln("inspect", digest[7:19])
    for words in ("why", "ship it", "previous image", "commit", head, "start it", "validate it"):
        assert words in human.out


def test_dirty_tree_is_recorded(hello: Path) -> None:
    (hello / "hello" / "extra.py").write_text("X = 1\n")
    digest = run_kiln("bake", str(hello), "--json").json()["digest"]
    info = run_kiln("inspect", digest, "--json").json()
    assert info["source"]["dirty"] is True
    assert "DIRTY" in run_kiln("inspect", digest).out


def test_images_lists_what_was_baked(hello: Path) -> None:
    assert run_kiln("images", "--json").json() == {"images": []}
    digest = run_kiln("bake", str(hello), "--json").json()["digest"]
    listed = run_kiln("images", "--json").json()["images"]
    assert [(i["digest"], i["app"]) for i in listed] == [(digest, "hello")]
    assert "hello" in run_kiln("images").out


# -- bad input: one clear line, exit 2, and the store is untouched ------------
def baked_store(hello: Path, home: Path) -> tuple[str, bytes]:
    digest = run_kiln("bake", str(hello), "--json").json()["digest"]
    return digest, (home / "images" / "index.json").read_bytes()


def assert_one_line_error(result: Any, *fragments: str) -> None:
    assert result.code == 2, (result.code, result.err)
    # Progress lines ("• step") may come first off a terminal; the error is one line.
    lines = [ln for ln in result.err.strip().splitlines() if not ln.startswith("• ")]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.err


def test_missing_and_invalid_config(tmp_path: Path, hello: Path, kiln_env: Path) -> None:
    _, index = baked_store(hello, kiln_env)
    assert_one_line_error(run_kiln("bake", str(tmp_path / "nowhere")), "no kiln.toml", "kiln init")
    cfg = hello / "kiln.toml"
    cfg.write_text(cfg.read_text().replace('name = "hello"', "name = 42"))
    assert_one_line_error(run_kiln("bake", str(hello)), "kiln.toml", "app.name", "must be a string")
    cfg.write_text(
        cfg.read_text()
        .replace('include = ["hello/"]', 'include = ["nothing-here/"]')
        .replace("name = 42", 'name = "hello"')
    )
    assert_one_line_error(
        run_kiln("bake", str(hello)), "build.include pattern 'nothing-here/' matches no file"
    )
    assert (kiln_env / "images" / "index.json").read_bytes() == index


def test_lock_whose_hashes_do_not_match(hello: Path, kiln_env: Path) -> None:
    _, index = baked_store(hello, kiln_env)
    lock = hello / "requirements.lock"
    text = lock.read_text()
    flask_block = re.search(r"^flask==.*?(?=^\S)", text, re.M | re.S)
    assert flask_block
    forged = re.sub(r"sha256:[0-9a-f]{64}", "sha256:" + "0" * 64, flask_block.group(0))
    lock.write_text(text.replace(flask_block.group(0), forged))
    result = run_kiln("bake", str(hello))
    assert_one_line_error(result, "cannot install requirements.lock", "flask")
    assert "Hash mismatch" in result.err
    assert (kiln_env / "images" / "index.json").read_bytes() == index
    assert_store_consistent(kiln_env)


def test_unpinned_or_unhashed_lock(hello: Path) -> None:
    lock = hello / "requirements.lock"
    lock.write_text("flask>=3\n")
    assert_one_line_error(run_kiln("bake", str(hello)), "'flask>=3' is not pinned", "kiln lock")
    lock.write_text("flask==3.1.3\n")
    assert_one_line_error(run_kiln("bake", str(hello)), "flask==3.1.3 has no --hash")
    lock.unlink()
    assert_one_line_error(run_kiln("bake", str(hello)), "no lock file", "kiln lock")


def test_lock_resolves_with_hashes_and_refuses_unknown_packages(hello: Path) -> None:
    (hello / "requirements.lock").unlink()
    result = run_kiln("lock", str(hello), "--json")
    assert result.code == 0, result.err
    names = {p["name"] for p in result.json()["packages"]}
    assert {"flask", "gunicorn", "werkzeug"} <= names
    text = (hello / "requirements.lock").read_text()
    assert text.count("--hash=sha256:") >= len(names)
    (hello / "requirements.in").write_text("kiln-no-such-package-for-tests==1.0\n")
    failed = run_kiln("lock", str(hello))
    assert_one_line_error(
        failed, "cannot resolve requirements.in", "kiln-no-such-package-for-tests"
    )
    assert (hello / "requirements.lock").read_text() == text  # the old lock is kept


def test_missing_mmdebstrap_says_how_to_install(hello: Path, tmp_path: Path) -> None:
    # Only the venv on PATH: no mmdebstrap (and no git), and a cache without a base.
    env = {"PATH": str(KILN.parent), "KILN_CACHE_DIR": str(tmp_path / "empty-cache")}
    result = run_kiln("bake", str(hello), env=env)
    assert_one_line_error(result, "mmdebstrap is not installed", "apt-get install mmdebstrap")


def test_unknown_image_and_bad_tag(hello: Path) -> None:
    run_kiln("bake", str(hello))
    assert_one_line_error(run_kiln("inspect", "hello:nope"), "no image tagged 'hello:nope'")
    assert_one_line_error(run_kiln("inspect", "0123456789ab"), "no image '0123456789ab'")
    assert_one_line_error(run_kiln("export", "zz", "-o", "/tmp/x.tar"), "not an image reference")
    assert_one_line_error(run_kiln("bake", str(hello), "--tag", "bad tag!"), "invalid tag")


@pytest.mark.parametrize(
    "point", ["bake.after-base", "bake.after-layers", "bake.before-index", "bake.after-index"]
)
def test_interrupted_bake_leaves_the_store_consistent(
    hello: Path, kiln_env: Path, point: str
) -> None:
    first = run_kiln("bake", str(hello), "--json").json()["digest"]
    module = hello / "hello" / "__init__.py"
    module.write_text(module.read_text() + "\n# changed\n")
    killed = run_kiln("bake", str(hello), env={"KILN_FAULT": point})
    assert killed.code == -9
    assert_store_consistent(kiln_env)
    listed = {i["digest"] for i in run_kiln("images", "--json").json()["images"]}
    if point == "bake.after-index":
        assert len(listed) == 2  # published whole, just before the end
    else:
        assert listed == {first}  # nothing half-written is visible
    assert run_kiln("inspect", "hello:latest", "--json").code == 0
    again = run_kiln("bake", str(hello), "--json")
    assert again.code == 0, again.err
    assert again.json()["digest"] != first
    assert_store_consistent(kiln_env)
    assert not any((kiln_env / "images" / "tmp").iterdir())


def test_corrupt_store_is_refused_on_export(hello: Path, kiln_env: Path, tmp_path: Path) -> None:
    digest = run_kiln("bake", str(hello), "--json").json()["digest"]
    app_layer = store_of(kiln_env).manifest(digest)["layers"][-1]["digest"]
    blob = store_of(kiln_env).blob_path(app_layer)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    blob.write_bytes(bytes(data))
    result = run_kiln("export", digest, "-o", str(tmp_path / "x.tar"))
    assert result.code == 1
    assert f"blob {app_layer}" in result.err and "corrupt" in result.err
    assert not (tmp_path / "x.tar").exists()


def test_init_writes_a_valid_config(tmp_path: Path) -> None:
    app = tmp_path / "svc"
    (app / "svc").mkdir(parents=True)
    (app / "svc" / "__init__.py").write_text("from flask import Flask\napp = Flask(__name__)\n")
    (app / "requirements.txt").write_text("flask\ngunicorn\n")
    result = run_kiln("init", str(app))
    assert result.code == 0, result.err
    text = (app / "kiln.toml").read_text()
    assert 'name = "svc"' in text and '"svc:app"' in text and 'include = ["svc/"]' in text
    assert_one_line_error(run_kiln("init", str(app)), "already exists", "--force")


# -- the export runs under Podman ------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(
    shutil.which("podman") is None, reason="podman is not installed (make setup installs it)"
)
def test_export_loads_and_runs_read_only_in_podman(hello: Path, tmp_path: Path) -> None:
    digest = run_kiln("bake", str(hello), "--json", "--tag", "podmantest").json()["digest"]
    archive = tmp_path / "hello.tar"
    exported = run_kiln("export", digest, "-o", str(archive), "--json")
    assert exported.code == 0, exported.err
    conf = tmp_path / "containers.conf"
    # Podman on these hosts: runc (crun refuses hybrid cgroups), no default ulimits.
    conf.write_text(
        '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
    )
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def podman(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args], capture_output=True, text=True, env=env, timeout=120, check=False
        )

    loaded = podman("load", "-i", str(archive))
    assert loaded.returncode == 0, loaded.stderr
    ref = re.search(r"Loaded image: (\S+)", loaded.stdout + loaded.stderr)
    assert ref, loaded.stdout
    port = free_port()
    name = f"kiln-test-{port}"
    run = podman(
        "run",
        "-d",
        "--rm",
        "--read-only",
        "--network",
        "host",
        "-e",
        f"PORT={port}",
        "--name",
        name,
        ref.group(1),
    )
    try:
        assert run.returncode == 0, run.stderr
        body = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                    body = resp.read().decode()
                    break
            except OSError:
                time.sleep(0.2)
        assert "Hello from hello" in body
        whoami = podman("exec", name, "id", "-u")
        assert whoami.stdout.strip() == "1000"  # runs as the unprivileged app user
        touch = podman("exec", name, "touch", "/app/x")
        assert touch.returncode != 0  # the root filesystem is read-only
    finally:
        podman("rm", "-f", name)
        podman("rmi", "-f", ref.group(1))


def test_base_layer_is_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two independent mmdebstrap builds of the same base give the same layer."""
    from kiln.base import BaseSpec, ensure_base

    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap is not installed (make setup installs it)")
    monkeypatch.setenv("KILN_BASE_EPOCH", "1767225600")
    digests = []
    for n in (1, 2):
        monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / f"cache{n}"))
        store = ImageStore(tmp_path / f"store{n}")
        store.init()
        base = ensure_base(BaseSpec("debian:bookworm"), store)
        assert not base.cached
        digests.append(base.digest)
    assert digests[0] == digests[1]
