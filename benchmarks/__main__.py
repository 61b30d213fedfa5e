"""`python -m benchmarks [NAME ...]`: run benchmarks, print a table, save JSON."""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.common import Row

SUITES = ("bake", "release", "router", "heal", "zero", "scale", "logs")
RESULTS = Path(__file__).parent / "results"


def main(argv: list[str]) -> int:
    names = argv or list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(SUITES)}", file=sys.stderr)
        return 2
    console = Console()
    rows: list[Row] = []
    for name in names:
        console.print(f"[bold]running {name} benchmarks…[/]")
        module = importlib.import_module(f"benchmarks.{name}")
        rows += module.run(console)
    table = Table(title="kiln benchmarks")
    for col in ("benchmark", "kiln", "reference", "ratio", "note"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row.cells())
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = RESULTS / f"{stamp}.json"
    out.write_text(json.dumps([r.to_json() for r in rows], indent=1))
    (RESULTS / "latest.json").write_text(out.read_text())
    console.print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
