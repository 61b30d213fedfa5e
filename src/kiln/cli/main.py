"""``kiln``: the command line entry point."""

from __future__ import annotations

import os
import sys
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

import kiln
from kiln.cli.output import ago, emit_json, err, human_size, out, short, steps
from kiln.errors import KilnError
from kiln.home import Home


def _home() -> Home:
    return Home.from_env()


def _store() -> Any:
    from kiln.store import ImageStore

    home = _home()
    store = ImageStore(home.images)
    if not (home.images / "index.json").exists():
        store.init()
    return store


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document on stdout."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(kiln.__version__, prog_name="kiln")
def cli() -> None:
    """kiln: bake immutable images of Python web services, test them, release them
    as new instances behind a router, roll back instantly, and see everything.

    KILN_HOME (default ~/.local/share/kiln) holds images, state and logs.
    """


# -- authoring -----------------------------------------------------------
@cli.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace an existing kiln.toml.")
def init(directory: Path, force: bool) -> None:
    """Write a commented kiln.toml for the app in DIRECTORY."""
    from kiln.scaffold import init as scaffold

    path = scaffold(directory, force=force)
    err.print(f"wrote {path}; next: [bold]kiln lock[/] then [bold]kiln bake[/]")


@cli.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False, path_type=Path))
@json_option
def lock(directory: Path, as_json: bool) -> None:
    """Resolve the app's dependencies into a hash-pinned lock."""
    from kiln.config import load_config
    from kiln.deps import resolve_lock

    config = load_config(directory)
    with steps(not as_json) as step:
        step(f"resolving {config.build.lock} for Python {config.build.python}")
        path, pins = resolve_lock(config)
    if as_json:
        emit_json(
            {"lock": str(path), "packages": [{"name": p.name, "version": p.version} for p in pins]}
        )
        return
    err.print(f"locked {len(pins)} packages with hashes into {path}")


# -- images --------------------------------------------------------------
@cli.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--reason", help="Why this image is baked; kept in its provenance.")
@click.option(
    "--tag", "tags", multiple=True, help="Extra tag (repeatable); 'latest' is always set."
)
@json_option
def bake(directory: Path, reason: str | None, tags: tuple[str, ...], as_json: bool) -> None:
    """Bake the app in DIRECTORY into an immutable image; prints its digest."""
    from kiln.bake import bake as do_bake

    with steps(not as_json) as step:
        result = do_bake(directory, _home(), reason=reason, tags=tags, progress=step)
    _record_bake(result)
    if as_json:
        emit_json(result.to_json())
        return
    table = Table(box=None, show_header=True, pad_edge=False)
    for col in ("layer", "digest", "size", ""):
        table.add_column(col)
    for r in result.layers:
        table.add_row(
            r.name,
            short(r.layer.digest),
            human_size(r.layer.size),
            "cached" if r.cached else "built",
        )
    err.print(table)
    state = "already in the store" if result.already_stored else "new"
    err.print(
        f"baked [bold]{result.app}[/] ({state}) in {result.seconds:.1f}s, "
        f"{human_size(result.size)}, tags: {', '.join(result.tags)}"
    )
    out.print(result.digest)


def _record_bake(result: Any) -> None:
    """Bakes run without the daemon; they join the audit trail directly."""
    from kiln.state import State

    state = State(_home().state_db)
    try:
        state.event(
            "bake",
            f"baked {result.app} {short(result.digest)} ({'cached' if result.already_stored else 'new'})",
            image=result.digest,
            data={"tags": list(result.tags), "seconds": round(result.seconds, 3)},
        )
    finally:
        state.close()


@cli.command()
@json_option
def images(as_json: bool) -> None:
    """List the images in the store."""
    from kiln.images import image_size

    store = _store()
    records = store.images()
    rows = [
        {
            "digest": r.digest,
            "app": r.app,
            "tags": list(r.tags),
            "stored": r.stored,
            "size": image_size(store, r.digest),
        }
        for r in records
    ]
    if as_json:
        emit_json({"images": rows})
        return
    if not rows:
        err.print("no images yet; bake one with [bold]kiln bake[/]")
        return
    table = Table(show_header=True)
    for col in ("app", "image", "tags", "size", "stored"):
        table.add_column(col)
    for row in rows:
        table.add_row(
            row["app"],
            short(row["digest"]),
            ", ".join(row["tags"]) or "-",
            human_size(row["size"]),
            ago(row["stored"]),
        )
    out.print(table)


@cli.command()
@click.argument("image")
@json_option
def inspect(image: str, as_json: bool) -> None:
    """Where IMAGE came from and how to run, check and update it."""
    from kiln.images import describe

    store = _store()
    info = describe(store, store.resolve(image))
    if as_json:
        emit_json(info)
        return
    _print_inspect(info)


def _print_inspect(info: dict[str, Any]) -> None:
    src, build, base, run = info["source"], info["build"], info["base"], info["run"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()

    def row(label: str, value: object) -> None:
        grid.add_row(label, str(value) if value not in (None, "") else "-")

    row("image", info["digest"])
    row("app", f"{info['app']}   tags: {', '.join(info['tags']) or '-'}")
    row("created", f"{info['created']}  (fixed by the source; reproducible)")
    row(
        "built",
        f"{build.get('at', '-')} on {build.get('host', '-')} by {build.get('user', '-')} with kiln {build.get('kiln_version', '-')}",
    )
    row("why", build.get("reason") or "(no --reason given)")
    row("previous image", build.get("previous_image") or "none: first image of this app")
    row("repository", src["repository"] or build.get("source_path"))
    commit = src["revision"] or "not a git checkout"
    row("commit", f"{commit}{'  (tree was DIRTY: uncommitted changes)' if src['dirty'] else ''}")
    row("version", src["version"])
    row("project", f"{info['app']} from {build.get('source_path', '-')}")
    row("base", f"{base['name']} + Python {base['python']}  {base['digest']}")
    row("lock", info["lock_digest"])
    pkgs = info["sbom"]["python_packages"]
    row(
        "sbom",
        f"{info['sbom']['format']}: {len(pkgs)} Python packages, {info['sbom']['debian_packages']} Debian packages",
    )
    row("python packages", ", ".join(f"{k}=={v}" for k, v in sorted(pkgs.items())))
    row(
        "size",
        " + ".join(f"{layer['name']} {human_size(layer['size'])}" for layer in info["layers"])
        + f" = {human_size(info['size'])}",
    )
    row("command", " ".join(run["command"]))
    row("runs as", f"uid {run['user']} in {run['workdir']}, PORT default {run['port']}")
    row(
        "health",
        f"GET {info['health']['path']} (2xx = ready, timeout {info['health']['timeout']}s)",
    )
    tests = info["tests"]
    row(
        "tests",
        ", ".join(
            f"{t['suite']} {t['result']} ({t['when'][:19]}, kiln {t['kiln_version']})"
            for t in tests
        )
        if tests
        else "none recorded yet: run kiln test",
    )
    row(
        "attestations", ", ".join(f"{a['type']} {short(a['digest'])}" for a in info["attestations"])
    )
    for key, label in (
        ("start", "start it"),
        ("validate", "validate it"),
        ("monitor", "monitor it"),
        ("update", "update it"),
    ):
        row(label, info["how"][key])
    out.print(grid)


@cli.command()
@click.argument("image_a")
@click.argument("image_b")
@json_option
def diff(image_a: str, image_b: str, as_json: bool) -> None:
    """What changed from IMAGE_A to IMAGE_B: files, dependencies, config."""
    from kiln.images import diff as do_diff

    store = _store()
    result = do_diff(store, store.resolve(image_a), store.resolve(image_b))
    if as_json:
        emit_json(result)
        return
    out.print(
        f"[bold]{short(result['a'])}[/] → [bold]{short(result['b'])}[/]  ({result['shared_layers']} layers shared)"
    )
    files = result["files"]
    for sign, key, style in (
        ("+", "added", "green"),
        ("-", "removed", "red"),
        ("~", "changed", "yellow"),
    ):
        for path in files[key]:
            out.print(f"[{style}]{sign} {path}[/]")
    for section in ("python_packages", "debian_packages", "config", "annotations"):
        changes = result[section]
        for name, value in changes["added"].items():
            out.print(f"[green]+ {section}: {name} {value}[/]")
        for name, value in changes["removed"].items():
            out.print(f"[red]- {section}: {name} {value}[/]")
        for name, (old, new) in changes["changed"].items():
            out.print(f"[yellow]~ {section}: {name}: {old} → {new}[/]")
    if not any(files.values()) and not any(
        any(result[s].values()) for s in ("python_packages", "config")
    ):
        out.print("no differences in files, dependencies or config")


@cli.command()
@click.argument("image")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The .tar to write.",
)
@json_option
def export(image: str, output: Path, as_json: bool) -> None:
    """Write IMAGE as an OCI archive that podman/docker load."""
    from kiln.images import export as do_export

    store = _store()
    record = store.resolve(image)
    size = do_export(store, record, output)
    if as_json:
        emit_json({"digest": record.digest, "output": str(output), "size": size})
        return
    err.print(f"wrote {output} ({human_size(size)}); load it with: podman load -i {output}")


def _register_commands() -> None:
    from kiln.cli.acceptance import test
    from kiln.cli.releases import COMMANDS

    for command in [test, *COMMANDS]:
        cli.add_command(command)


_register_commands()


# -- entry point -----------------------------------------------------------
def _debug_log(exc: BaseException) -> Path | None:
    try:
        home = Home.from_env()
        home.root.mkdir(parents=True, exist_ok=True)
        with open(home.debug_log, "a", encoding="utf-8") as fh:
            fh.write(f"--- {datetime.now(UTC).isoformat()} kiln {' '.join(sys.argv[1:])}\n")
            fh.write("".join(traceback.format_exception(exc)))
        return home.debug_log
    except OSError:
        return None


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC however it surfaces: as an OSError, or as SQLite's own words."""
    import errno
    import sqlite3

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
    except click.exceptions.Abort:
        err.print("[red]aborted[/]")
        sys.exit(130)
    except KilnError as exc:
        _debug_log(exc)
        err.print(f"[bold red]error:[/] {escape(str(exc))}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as exc:
        if _disk_full(exc):
            _debug_log(exc)
            home = Home.from_env().root
            err.print(
                f"[bold red]error:[/] no space left on device under {escape(str(home))} or the build cache "
                "(free some space and run it again; nothing half-written was published)"
            )
            sys.exit(1)
        where = _debug_log(exc)
        detail = f" (traceback in {where}; please report it)" if where else ""
        err.print(f"[bold red]internal error:[/] {escape(f'{type(exc).__name__}: {exc}')}{detail}")
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
