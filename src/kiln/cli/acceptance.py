"""``kiln test``: the acceptance gate, run from the CLI in-process."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType

import click
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from kiln.cli.output import emit_json, err, out, short, steps
from kiln.home import Home

RESULT_STYLE = {"passed": "green", "failed": "red", "error": "bold red", "skipped": "yellow"}


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C, so the ephemeral instance is always removed.
    raise KeyboardInterrupt


@click.command("test")
@click.argument("image")
@click.option(
    "--suite",
    "suites",
    help="Comma-separated: service,integration,security,compliance (default: all).",
)
@click.option(
    "--tests",
    "tests_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The integration tests folder (default: from kiln.toml).",
)
@click.option(
    "--advisories",
    type=click.Path(path_type=Path),
    help="An offline OSV advisory database (file or folder).",
)
@click.option(
    "--junit", type=click.Path(dir_okay=False, path_type=Path), help="Also write JUnit XML here."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def test(
    image: str,
    suites: str | None,
    tests_dir: Path | None,
    advisories: Path | None,
    junit: Path | None,
    as_json: bool,
) -> None:
    """Boot a sealed, ephemeral instance of IMAGE and run the acceptance suites
    against it; the result is recorded as an attestation on the image."""
    from kiln.errors import KilnError
    from kiln.testing.results import junit_xml
    from kiln.testing.runner import parse_suites, run_tests

    chosen = parse_suites(suites)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with steps(not as_json) as step:
            run = run_tests(
                Home.from_env(),
                image,
                chosen,
                tests_dir=tests_dir,
                advisories=advisories,
                progress=step,
            )
    finally:
        signal.signal(signal.SIGTERM, previous)
    if junit is not None:
        try:
            junit.write_bytes(junit_xml(run.record.digest, run.suites))
        except OSError as exc:
            raise KilnError(f"cannot write {junit}: {exc.strerror or exc}") from exc
    if as_json:
        emit_json(run.to_json())
    else:
        _print(run)
    if not run.passed:
        raise SystemExit(1)


def _print(run: object) -> None:
    from kiln.testing.runner import TestRun

    assert isinstance(run, TestRun)
    for suite in run.suites:
        table = Table(
            title=f"{suite.suite}: {suite.result}", title_justify="left", show_header=False
        )
        table.add_column("check")
        table.add_column("result")
        table.add_column("detail")
        for check in suite.checks:
            detail = escape(check.detail)
            if check.result != "passed" and check.evidence:
                detail += "\n" + "\n".join(escape(e) for e in check.evidence[:20])
            table.add_row(
                check.name, Text(check.result, style=RESULT_STYLE.get(check.result, "")), detail
            )
        out.print(table)
    summary = Table(
        title=f"kiln test {run.record.app} {short(run.record.digest)}", title_justify="left"
    )
    for col in ("suite", "result", "checks", "failed"):
        summary.add_column(col)
    for suite in run.suites:
        failed = sum(1 for c in suite.checks if c.result in ("failed", "error"))
        summary.add_row(
            suite.suite,
            Text(suite.result, style=RESULT_STYLE.get(suite.result, "")),
            str(len(suite.checks)),
            str(failed),
        )
    out.print(summary)
    verdict = "[bold green]all suites passed[/]" if run.passed else "[bold red]tests failed[/]"
    err.print(f"{verdict}; attestation {short(run.attestation)} stored with the image")
