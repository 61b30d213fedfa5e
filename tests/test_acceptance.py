"""End to end: `kiln test` against live instances, and the release gate it feeds."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.runtime.local import LocalRuntime
from kit import KILN, git, run_kiln
from releasekit import bake, cleanup, free_port, make_app

pytestmark = pytest.mark.slow

SUITES = ["service", "integration", "security", "compliance"]


@pytest.fixture(autouse=True)
def _stop_everything(kiln_env: Path) -> Iterator[None]:
    yield
    cleanup(kiln_env)


def live_test_instances(home: Path) -> list[str]:
    return [h.id for h in LocalRuntime().find(home / "rootfs") if h.id.startswith("test-")]


def scratch_dirs() -> set[str]:
    return {p.name for p in Path("/tmp").glob("kiln-test-*")}


def test_clean_example_passes_every_suite(tmp_path: Path, kiln_env: Path) -> None:
    app = make_app(tmp_path / "app", free_port())
    image = bake(app)
    before = scratch_dirs()
    junit = tmp_path / "junit.xml"
    result = run_kiln("test", image, "--json", "--junit", str(junit), cwd=app)
    assert result.code == 0, result.err + result.out
    report = result.json()
    assert report["passed"] is True
    assert [s["suite"] for s in report["suites"]] == SUITES
    assert all(s["result"] == "passed" for s in report["suites"])
    checks = {c["name"] for s in report["suites"] for c in s["checks"]}
    assert {
        "no secrets in the image",
        "the app runs as non-root",
        "writing to the root filesystem fails",
    } <= checks
    assert any(name.startswith("clean shutdown on SIGTERM") for name in checks)
    assert any("test_greets" in name for name in checks)  # the app's own pytest suite ran
    suites = ET.parse(junit).getroot().findall("testsuite")
    assert [s.get("name") for s in suites] == SUITES and all(
        s.get("failures") == "0" for s in suites
    )
    tests = run_kiln("inspect", image, "--json").json()["tests"]
    assert [(t["suite"], t["result"]) for t in tests] == [(s, "passed") for s in SUITES]
    assert all(t["kiln_version"] and t["when"] for t in tests)
    # The ephemeral instance and its files are gone.
    assert live_test_instances(kiln_env) == []
    assert scratch_dirs() <= before


def test_planted_secrets_fail_security_naming_each(tmp_path: Path) -> None:
    app = make_app(tmp_path / "app", free_port())
    key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----\n"
    (app / "hello" / "deploy_key.pem").write_text(key)
    (app / "hello" / "settings.py").write_text('AWS_KEY = "AKIAZ7XQ2M4K8JD3PLQW"\n')
    git(app, "add", "-A")
    git(app, "commit", "-qm", "oops")
    image = bake(app)
    result = run_kiln("test", image, "--suite", "security", "--json")
    assert result.code == 1
    (security,) = result.json()["suites"]
    (secrets,) = [c for c in security["checks"] if c["name"] == "no secrets in the image"]
    assert secrets["result"] == "failed"
    evidence = "\n".join(secrets["evidence"])
    assert "/app/hello/deploy_key.pem:1: private key" in evidence
    assert "/app/hello/settings.py:1: AWS access key id" in evidence
    human = run_kiln("test", image, "--suite", "security")
    assert "deploy_key.pem" in human.out and "settings.py" in human.out


def test_failed_integration_is_refused_by_production_unless_forced(tmp_path: Path) -> None:
    app = make_app(tmp_path / "app", free_port())
    failing = app / "tests" / "acceptance" / "test_hello.py"
    failing.write_text(
        failing.read_text()
        + "\n\ndef test_that_fails(base_url: str) -> None:\n    assert base_url == 'nope'\n"
    )
    git(app, "commit", "-qam", "a failing acceptance test")
    image = bake(app)
    tested = run_kiln("test", image, "--json", cwd=app)
    assert tested.code == 1
    results = {s["suite"]: s["result"] for s in tested.json()["suites"]}
    assert results == {
        "service": "passed",
        "integration": "failed",
        "security": "passed",
        "compliance": "passed",
    }, tested.out
    refused = run_kiln("release", image, "--env", "production")
    assert refused.code == 2
    line = next(ln for ln in refused.err.splitlines() if ln.startswith("error:"))
    assert "'production' only takes images that passed their tests" in line
    assert "integration (failed)" in line and "service" not in line.split("for:")[1]
    # Staging does not require tests; production with --force does release, audited.
    forced = run_kiln("release", image, "--env", "production", "--force", "--json")
    assert forced.code == 0, forced.err
    events = run_kiln("events", "--json").json()["events"]
    (audit,) = [e for e in events if e["kind"] == "release.forced"]
    assert "integration (failed)" in audit["message"] and audit["actor"]
    kinds = [e["kind"] for e in events]
    assert "test.finished" in kinds and "bake" in kinds


def test_never_tested_image_is_refused_by_production(tmp_path: Path) -> None:
    image = bake(make_app(tmp_path / "app", free_port()))
    refused = run_kiln("release", image, "--env", "production")
    assert refused.code == 2 and "service (never run)" in refused.err


def test_interrupted_test_leaves_nothing_behind(tmp_path: Path, kiln_env: Path) -> None:
    app = make_app(tmp_path / "app", free_port())
    image = bake(app)
    slow = tmp_path / "slow-tests"
    slow.mkdir()
    (slow / "test_slow.py").write_text(
        "import time\n\ndef test_slow() -> None:\n    time.sleep(60)\n"
    )
    before = scratch_dirs()
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen(
            [str(KILN), "test", image, "--suite", "integration", "--tests", str(slow)]
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not live_test_instances(kiln_env):
            time.sleep(0.1)
        assert live_test_instances(kiln_env), "the ephemeral instance never started"
        time.sleep(1)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) != 0
        assert live_test_instances(kiln_env) == []
        assert scratch_dirs() <= before


def test_instance_of_a_killed_kiln_test_is_reaped_by_the_next(
    tmp_path: Path, kiln_env: Path
) -> None:
    app = make_app(tmp_path / "app", free_port())
    image = bake(app)
    slow = tmp_path / "slow-tests"
    slow.mkdir()
    (slow / "test_slow.py").write_text(
        "import time\n\ndef test_slow() -> None:\n    time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [str(KILN), "test", image, "--suite", "integration", "--tests", str(slow)]
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not live_test_instances(kiln_env):
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert live_test_instances(kiln_env)  # SIGKILL leaves no chance to clean up…
    assert run_kiln("test", image, "--suite", "compliance,service").code == 0
    assert live_test_instances(kiln_env) == []  # …so the next kiln test does it


def test_bad_input_gets_clear_errors(tmp_path: Path) -> None:
    app = make_app(tmp_path / "app", free_port())
    image = bake(app)
    missing = run_kiln("test", image, "--tests", str(tmp_path / "nowhere"))
    assert missing.code == 2 and "nowhere does not exist" in missing.err
    assert run_kiln("test", image, "--suite", "speed").code == 2
    bad_db = tmp_path / "osv.json"
    bad_db.write_text("{not json")
    broken = run_kiln("test", image, "--suite", "security", "--advisories", str(bad_db))
    assert broken.code == 2 and "not valid JSON" in broken.err
    cfg = app / "kiln.toml"
    cfg.write_text(cfg.read_text() + '\n[test.compliance]\nmax_size = "huge"\n')
    unparseable = run_kiln("bake", str(app))
    assert unparseable.code == 2 and "test.compliance.max_size must be a size" in unparseable.err


def test_integration_folder_that_does_not_exist(tmp_path: Path) -> None:
    app = make_app(
        tmp_path / "app",
        free_port(),
        toml_edits={'integration = "tests/acceptance"': 'integration = "tests/missing"'},
    )
    image = bake(app)
    result = run_kiln("test", image, cwd=tmp_path)
    assert result.code == 2
    assert (
        "integration tests folder 'tests/missing' (from [test].integration) does not exist"
        in result.err
    )


def test_health_that_never_becomes_ready(tmp_path: Path) -> None:
    app = make_app(
        tmp_path / "app",
        free_port(),
        toml_edits={'path = "/status"': 'path = "/nope"', 'timeout = "15s"': 'timeout = "3s"'},
    )
    image = bake(app)
    result = run_kiln("test", image, "--suite", "service", "--json")
    assert result.code == 1
    (service,) = result.json()["suites"]
    ready = service["checks"][0]
    assert ready["name"] == "ready within 3s" and ready["result"] == "failed"
    assert "GET /nope answered 404" in ready["detail"]


def test_known_vulnerable_dependency_is_flagged(tmp_path: Path) -> None:
    image = bake(make_app(tmp_path / "app", free_port()))
    osv = tmp_path / "osv"
    osv.mkdir()
    (osv / "GHSA-test.json").write_text(
        json.dumps(
            {
                "id": "GHSA-kiln-test",
                "summary": "made up for the test",
                "affected": [
                    {
                        "package": {"ecosystem": "PyPI", "name": "Flask"},
                        "ranges": [
                            {
                                "type": "ECOSYSTEM",
                                "events": [{"introduced": "0"}, {"fixed": "99.0"}],
                            }
                        ],
                    }
                ],
            }
        )
    )
    result = run_kiln("test", image, "--suite", "security", "--advisories", str(osv), "--json")
    assert result.code == 1
    (vuln,) = [c for c in result.json()["suites"][0]["checks"] if "vulnerable" in c["name"]]
    assert (
        vuln["result"] == "failed"
        and vuln["evidence"][0].startswith("flask==")
        and "GHSA-kiln-test" in vuln["evidence"][0]
    )
