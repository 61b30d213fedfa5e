from __future__ import annotations

from pathlib import Path

import pytest

from kiln.config import load_config, parse_duration
from kiln.errors import ConfigError

GOOD = """
[app]
name = "svc"
command = ["gunicorn", "-b", "0.0.0.0:$PORT", "svc:app"]

[build]
include = ["svc/"]

[env.production]
listen = "127.0.0.1:8080"
vars = { GREETING = "Olá" }
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "kiln.toml").write_text(text)
    return tmp_path


def test_good_config_has_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.app.name == "svc"
    assert cfg.build.python == "3.11"
    assert cfg.health.path == "/"
    # production demands every suite by default
    assert cfg.envs["production"].require_tests == (
        "service",
        "integration",
        "security",
        "compliance",
    )
    assert cfg.envs["production"].vars == {"GREETING": "Olá"}
    assert cfg.release.canary.steps == (10, 50, 100)


def test_example_config_is_valid() -> None:
    cfg = load_config(Path(__file__).parent.parent / "examples" / "hello")
    assert cfg.app.name == "hello"
    assert cfg.health.path == "/status"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace('name = "svc"', 'name = "Bad Name"'), "app.name"),
        (GOOD.replace('name = "svc"\n', ""), "app.name is required"),
        (
            GOOD.replace('command = ["gunicorn", "-b", "0.0.0.0:$PORT", "svc:app"]', "command = 3"),
            "app.command must be a list",
        ),
        (GOOD + '\n[health]\npath = "status"\n', "health.path must start with '/'"),
        (GOOD + '\n[health]\ntimeout = "soon"\n', "health.timeout must be a duration"),
        (GOOD.replace("[build]", '[build]\npython = "3.9"'), "build.python"),
        (GOOD.replace("[build]", "[build]\nincldue = []"), "unknown key 'build.incldue'"),
        (
            GOOD.replace('listen = "127.0.0.1:8080"', 'listen = "8080"'),
            "env.production.listen must be HOST:PORT",
        ),
        (GOOD.replace('GREETING = "Olá"', 'PORT = "1"'), "must not set PORT"),
        (GOOD + "\n[release]\ncanary = { steps = [50, 10] }\n", "release.canary.steps must rise"),
        (GOOD + '\n[release]\nstrategy = "yolo"\n', "release.strategy must be one of"),
        ("[app\n", "not valid TOML"),
        ('[build]\ninclude = ["x"]\n', "[app] is required"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert message in str(info.value)
    assert "kiln.toml" in str(info.value)
    assert info.value.exit_code == 2


def test_missing_config_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no kiln\.toml.*kiln init"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("raw", "seconds"), [("30s", 30), ("15m", 900), ("250ms", 0.25), ("1h", 3600), (5, 5)]
)
def test_durations(raw: object, seconds: float) -> None:
    assert parse_duration(raw, "x") == seconds
