"""Acceptance tests `kiln test` runs against a live, sealed instance of the image.

`base_url`, `host` (pytest-testinfra, inside the instance) and `instance`
come from kiln's pytest plugin.
"""

from __future__ import annotations

import json
import urllib.request


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read().decode()


def test_greets(base_url: str) -> None:
    status, body = get(base_url + "/")
    assert status == 200
    assert body.startswith("Hello from hello")


def test_reports_ready_with_its_identity(base_url: str) -> None:
    status, body = get(base_url + "/status")
    info = json.loads(body)
    assert status == 200 and info["ready"] is True
    assert info["release"] == "test"


def test_code_is_in_place_and_read_only(host) -> None:  # type: ignore[no-untyped-def]
    app = host.file("/app/hello/__init__.py")
    assert app.exists and app.user == "root"
    assert host.run("touch /app/hello/x").rc != 0


def test_runs_as_the_app_user(host) -> None:  # type: ignore[no-untyped-def]
    assert host.user().name == "app"
    assert host.user("app").uid == 1000


def test_serves_on_its_port_with_pinned_packages(instance, base_url: str) -> None:  # type: ignore[no-untyped-def]
    assert int(base_url.rsplit(":", 1)[1]) in instance.listening()
    packages = instance.python_packages()
    assert "flask" in packages and "gunicorn" in packages
    assert all(p["uid"] != 0 for p in instance.processes())
