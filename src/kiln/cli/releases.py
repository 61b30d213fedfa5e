"""CLI commands that talk to the daemon: releases, rollbacks, status, the daemon itself."""

from __future__ import annotations

import time
from typing import Any

import click
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from kiln.cli.logs import logs
from kiln.cli.output import emit_json, err, out, short
from kiln.cli.times import to_time
from kiln.daemon.client import DaemonClient
from kiln.errors import DaemonError, ReleaseError
from kiln.home import Home

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document on stdout."
)
env_option = click.option("--env", "env", required=True, help="The environment, e.g. production.")
TERMINAL = ("serving", "aborted", "failed", "stopped", "retired", "warm")
STATE_STYLE = {
    "ready": "green",
    "serving": "bold green",
    "starting": "yellow",
    "draining": "cyan",
    "warm": "blue",
    "failed": "red",
    "aborted": "red",
    "stopped": "dim",
    "retired": "dim",
}


def client() -> DaemonClient:
    c = DaemonClient(Home.from_env())
    c.ensure()
    return c


def _styled(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def _release_panel(view: dict[str, Any]) -> Group:
    head = Text.assemble(
        (f"{view['release']} ", "bold"),
        (f"{view['app']} {short(view['image'])} → {view['env']} ({view['strategy']}): ", ""),
        _styled(view["state"]),
        (f"   traffic {view['weight']}%", ""),
    )
    table = Table(box=None, pad_edge=False)
    for col in ("instance", "state", "address", "health"):
        table.add_column(col)
    for inst in view["instances"]:
        health = "in rotation" if inst["in_rotation"] else (inst["exit_reason"] or "-")
        table.add_row(inst["id"], _styled(inst["state"]), inst["addr"], health)
    notes = [Text(f"  · {e['message']}", style="dim") for e in view.get("events", [])[-4:]]
    canary = view.get("canary")
    if canary:
        return Group(head, _canary_table(canary), table, *notes)
    return Group(head, table, *notes)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def _canary_table(canary: dict[str, Any]) -> Table:
    n = canary["numbers"]
    state = " (paused)" if canary["paused"] else ""
    table = Table(
        title=f"canary step {canary['step']}/{len(canary['steps'])} at {canary['weight']}%{state}",
        title_justify="left",
    )
    for col in ("", "requests", "errors", "p50", "p99"):
        table.add_column(col)
    for side in ("canary", "stable"):
        table.add_row(
            side,
            str(n.get(f"{side}_requests", 0)),
            _pct(n.get(f"{side}_error_rate")),
            _ms(n.get(f"{side}_p50")),
            _ms(n.get(f"{side}_p99")),
        )
    return table


def _poll(c: DaemonClient, release_id: int) -> dict[str, Any]:
    """The release's current view. A daemon that died is started again: the
    release is recorded, so the new daemon carries it on and we keep watching."""
    try:
        view: dict[str, Any] = c.get(f"/releases/{release_id}")
    except DaemonError:
        err.print("[yellow]the daemon went away; starting it again to carry on[/]")
        c.ensure()
        view = c.get(f"/releases/{release_id}")
    return view


def follow_release(c: DaemonClient, release_id: int, as_json: bool) -> dict[str, Any]:
    """Poll a release until it ends, showing its progress on a terminal."""
    view: dict[str, Any] = c.get(f"/releases/{release_id}")
    live = (
        Live(_release_panel(view), console=err, refresh_per_second=8, transient=False)
        if err.is_terminal and not as_json
        else None
    )
    seen = 0
    try:
        if live:
            live.start()
        while view["state"] not in TERMINAL:
            time.sleep(0.1)
            view = _poll(c, release_id)
            if live:
                live.update(_release_panel(view))
            elif not as_json:
                for event in view.get("events", [])[seen:]:
                    err.print(f"• {event['message']}")
                seen = len(view.get("events", []))
    finally:
        if live:
            live.stop()
    if not live and not as_json:
        for event in view.get("events", [])[seen:]:
            err.print(f"• {event['message']}")
    return view


def _failure_detail(view: dict[str, Any]) -> str:
    failed = [i for i in view["instances"] if i["state"] == "failed" and i.get("log_tail")]
    if not failed:
        return ""
    inst = failed[-1]
    tail = "\n".join(f"    {line}" for line in inst["log_tail"])
    return f"last lines of {inst['id']} ({inst['exit_reason']}):\n{tail}"


def _finish(view: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(view)
    if view["state"] == "aborted":
        detail = _failure_detail(view)
        if detail and not as_json:
            err.print(detail, markup=False, highlight=False)
        raise ReleaseError(
            f"{view['release']} to {view['env']} aborted: {view['reason']}",
            hint="the previous release keeps serving",
        )
    if not as_json:
        listen = view.get("listen")
        err.print(f"[bold green]{view['release']} serves {view['env']}[/] at http://{listen}/")


def _steps(raw: str | None) -> list[int] | None:
    if raw is None:
        return None
    try:
        steps = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{raw!r} is not a list of percentages like 10,50,100", param_hint="--steps"
        ) from None
    if not steps or any(not 0 < n <= 100 for n in steps) or steps != sorted(steps):
        raise click.BadParameter(
            "steps must rise from above 0 up to at most 100", param_hint="--steps"
        )
    return steps


def _interval(raw: str | None) -> float | None:
    if raw is None:
        return None
    from kiln.config import parse_duration
    from kiln.errors import ConfigError

    try:
        return parse_duration(raw, "--interval")
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--interval") from None


@click.command()
@click.argument("image")
@env_option
@click.option(
    "--strategy",
    type=click.Choice(["blue-green", "canary", "rolling"]),
    help="Default: from kiln.toml.",
)
@click.option(
    "--steps", help="Canary traffic steps in percent, e.g. 10,50,100 (default: kiln.toml)."
)
@click.option("--interval", help="Canary time per step, e.g. 30s (default: kiln.toml).")
@click.option(
    "--force", is_flag=True, help="Release even without the passing tests ENV requires (audited)."
)
@json_option
def release(
    image: str,
    env: str,
    strategy: str | None,
    steps: str | None,
    interval: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Release IMAGE into ENV as brand-new instances; waits until it serves.

    A canary sends a growing share of traffic to the new release and compares it
    with the stable one at every step; it aborts by itself when it is worse.
    """
    c = client()
    body = {
        "image": image,
        "env": env,
        "strategy": strategy,
        "steps": _steps(steps),
        "interval": _interval(interval),
        "force": force,
    }
    started = c.post("/releases", body)
    view = follow_release(c, started["id"], as_json)
    _finish(view, as_json)


@click.command()
@env_option
@click.option("--to", "to", help="The release to go back to, e.g. r3 (default: the previous one).")
@json_option
def rollback(env: str, to: str | None, as_json: bool) -> None:
    """Switch ENV back to the previous release (instant while it is warm)."""
    number = None
    if to is not None:
        raw = to.lower().removeprefix("r")
        if not raw.isdigit():
            raise click.BadParameter(f"{to!r} is not a release like r3", param_hint="--to")
        number = int(raw)
    started = time.monotonic()
    c = client()
    view = c.post("/rollback", {"env": env, "to": number})
    if view["state"] not in TERMINAL:
        view = follow_release(c, view["id"], as_json)
        _finish(view, as_json)
        return
    if as_json:
        emit_json({**view, "seconds": round(time.monotonic() - started, 4)})
        return
    err.print(
        f"[bold green]{view['release']} serves {env} again[/] ({time.monotonic() - started:.2f}s)"
    )


def _steer(env: str, command: str, as_json: bool) -> None:
    view = client().post("/steer", {"env": env, "command": command})
    if as_json:
        emit_json(view)
        return
    err.print(f"{view['release']} in {env}: {command}d")


@click.command()
@env_option
@json_option
def promote(env: str, as_json: bool) -> None:
    """Give the canary in ENV 100% of traffic now."""
    _steer(env, "promote", as_json)


@click.command()
@env_option
@json_option
def pause(env: str, as_json: bool) -> None:
    """Hold the canary in ENV at its current step."""
    _steer(env, "pause", as_json)


@click.command()
@env_option
@json_option
def resume(env: str, as_json: bool) -> None:
    """Let a paused canary in ENV go on (its current step is measured afresh)."""
    _steer(env, "resume", as_json)


@click.command()
@env_option
@json_option
def abort(env: str, as_json: bool) -> None:
    """Abort the release in progress in ENV; the serving release keeps 100%."""
    view = client().post("/abort", {"env": env})
    if as_json:
        emit_json(view)
        return
    err.print(f"{view['release']} aborted; {env} stays on its serving release")


@click.command()
@click.option("--env", "env", help="Only this environment.")
@json_option
def status(env: str | None, as_json: bool) -> None:
    """Releases with their traffic, instances with their health."""
    data = client().get("/status" + (f"?env={env}" if env else ""))
    if as_json:
        emit_json(data)
        return
    if not data["envs"]:
        err.print("nothing released yet; try [bold]kiln release IMAGE --env ENV[/]")
        return
    for e in data["envs"]:
        out.print(f"[bold]{e['env']}[/]  {e['url'] or '-'}")
        table = Table()
        for col in ("release", "image", "state", "traffic", "instance", "health", "uptime"):
            table.add_column(col)
        for r in e["releases"]:
            insts = r["instances"] or [None]
            for n, inst in enumerate(insts):
                first = n == 0
                table.add_row(
                    r["release"] if first else "",
                    short(r["image"]) if first else "",
                    _styled(r["state"]) if first else Text(""),
                    f"{r['weight']}%" if first else "",
                    inst["id"] if inst else "-",
                    _styled(inst["state"]) if inst else Text("-"),
                    f"{inst['uptime']:.0f}s" if inst else "",
                )
        out.print(table)


@click.command()
@json_option
def ps(as_json: bool) -> None:
    """Every running instance."""
    data = client().get("/ps")
    if as_json:
        emit_json(data)
        return
    table = Table()
    for col in ("instance", "env", "state", "address", "pid"):
        table.add_column(col)
    for i in data["instances"]:
        table.add_row(i["id"], i["env"], _styled(i["state"]), i["addr"], str(i["pid"] or "-"))
    out.print(table)


@click.command()
@env_option
@json_option
def history(env: str, as_json: bool) -> None:
    """Every release of ENV, newest first."""
    data = client().get(f"/history?env={env}")
    if as_json:
        emit_json(data)
        return
    table = Table()
    for col in ("release", "image", "strategy", "state", "by", "when", "note"):
        table.add_column(col)
    for r in reversed(data["releases"]):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"]))
        note = r["reason"] or (f"rollback to r{r['rollback_of']}" if r["rollback_of"] else "")
        table.add_row(
            r["release"],
            short(r["image"]),
            r["strategy"],
            _styled(r["state"]),
            r["actor"],
            when,
            note,
        )
    out.print(table)
    for r in reversed(data["releases"]):
        for d in r.get("trail", []):
            style = {"pass": "green", "fail": "red"}.get(d["result"], "yellow")
            out.print(
                f"{r['release']} step {d['step']} at {d['weight']}%: "
                f"[{style}]{d['result']}[/] {escape(d['reason'])}"
            )


@click.command()
@click.option("--env", "env", help="Only this environment.")
@click.option(
    "--since",
    metavar="TIME",
    callback=to_time,
    help="Only events since: 10m or 2h ago, an ISO or UNIX time.",
)
@json_option
def events(env: str | None, since: float | None, as_json: bool) -> None:
    """The audit trail: who did what, when, to which image."""
    query = "&".join(f"{k}={v}" for k, v in (("env", env), ("since", since)) if v is not None)
    data = client().get("/events" + (f"?{query}" if query else ""))
    if as_json:
        emit_json(data)
        return
    for e in data["events"]:
        when = time.strftime("%H:%M:%S", time.localtime(e["ts"]))
        where = e["env"] or "-"
        out.print(
            f"{when} [bold]{e['kind']:<20}[/] {where:<12} {e['actor']:<16} {e['message']}",
            markup=True,
        )


@click.group()
def daemon() -> None:
    """Start, stop or check the daemon (commands that need it start it)."""


@daemon.command("start")
def daemon_start() -> None:
    health = client().running()
    assert health is not None
    err.print(f"kiln daemon running (pid {health['pid']}) for {health['home']}")


@daemon.command("stop")
@click.option("--all", "everything", is_flag=True, help="Also stop every instance and the router.")
def daemon_stop(everything: bool) -> None:
    stopped = DaemonClient(Home.from_env()).stop(everything=everything)
    what = (
        "daemon, instances and router"
        if everything
        else "daemon (instances and router keep serving)"
    )
    err.print(f"stopped the {what}" if stopped else "the daemon was not running")


@daemon.command("status")
@json_option
def daemon_status(as_json: bool) -> None:
    health = DaemonClient(Home.from_env()).running()
    if as_json:
        emit_json({"running": bool(health), **(health or {})})
        return
    if health:
        err.print(f"running: pid {health['pid']}, KILN_HOME {health['home']}")
    else:
        err.print("not running")
        raise SystemExit(1)


COMMANDS = [
    release,
    rollback,
    promote,
    pause,
    resume,
    abort,
    status,
    ps,
    history,
    events,
    logs,
    daemon,
]
