"""``kiln init``: a commented kiln.toml for the app in a directory, guessed from what is there."""

from __future__ import annotations

import re
from pathlib import Path

from kiln.config import APP_NAME_RE, CONFIG_NAME, load_config
from kiln.errors import UsageError

_TEMPLATE = """\
# kiln.toml: how kiln bakes, tests and releases this app.
# Reference: kiln's README. Every key below is optional unless marked required.

[app]
name = "{name}"                      # required: lowercase, digits, . _ -
# required: the program that serves HTTP on $PORT (kiln sets PORT per instance)
command = {command}

[build]
python = "3.11"                      # debian:bookworm ships 3.11
lock = "requirements.lock"           # hash-pinned; `kiln lock` writes it from {source}
include = {include}                  # gitignore-style patterns; .gitignore is honoured
# exclude = ["tests/"]

[health]
path = "/"                           # 2xx = ready; anything else = not ready
timeout = "30s"

[test]
service = [{{ path = "/", status = 200 }}]

[release]
strategy = "blue-green"              # blue-green | canary | rolling
replicas = 2
keep_previous = "15m"                # the previous release stays warm: instant rollback

[env.staging]
listen = "127.0.0.1:8081"

[env.production]
listen = "127.0.0.1:8080"
require_tests = true
"""


def _find_app_module(root: Path) -> str | None:
    for path in sorted(root.rglob("*.py")):
        if any(
            part.startswith(".") or part in ("venv", "tests")
            for part in path.relative_to(root).parts
        ):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        m = re.search(r"^(\w+)\s*=\s*(Flask|FastAPI|Starlette|Quart)\(", text, re.M)
        if m:
            rel = path.relative_to(root).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            return ".".join(parts) + ":" + m.group(1)
    return None


def _requirements_text(root: Path) -> tuple[str, str]:
    for name in ("requirements.in", "requirements.txt", "pyproject.toml"):
        if (root / name).is_file():
            return name, (root / name).read_text(encoding="utf-8", errors="replace").lower()
    return "requirements.in (create it)", ""


def init(root: Path, force: bool = False) -> Path:
    """Write ``root/kiln.toml``; returns its path. Refuses to overwrite unless ``force``."""
    path = root / CONFIG_NAME
    if path.exists() and not force:
        raise UsageError(f"{path} already exists", hint="edit it, or pass --force to replace it")
    name = re.sub(r"[^a-z0-9._-]+", "-", root.absolute().name.lower()).strip("-._") or "app"
    if not APP_NAME_RE.match(name):
        name = "app"
    source, reqs = _requirements_text(root)
    target = _find_app_module(root) or "app:app"
    if "uvicorn" in reqs or "fastapi" in reqs:
        command = ["uvicorn", "--host", "0.0.0.0", "--port", "$PORT", target]
    else:
        command = ["gunicorn", "--bind", "0.0.0.0:$PORT", target]
    module_dir = target.split(":")[0].split(".")[0]
    include = [f"{module_dir}/"] if (root / module_dir).is_dir() else [f"{module_dir}.py"]
    if not (root / include[0].rstrip("/")).exists():
        include = ["."]
    text = _TEMPLATE.format(
        name=name,
        command="[" + ", ".join(f'"{c}"' for c in command) + "]",
        source=source,
        include="[" + ", ".join(f'"{i}"' for i in include) + "]",
    )
    path.write_text(text, encoding="utf-8")
    load_config(root)  # what we write must be valid
    return path
