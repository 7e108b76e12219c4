"""`shardlight report OUT [--open]`: write a run's HTML report (registered in flows/cli.py)."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console()


def report(
    out: str = typer.Argument(..., help="Output folder of a run."),
    open_: bool = typer.Option(False, "--open", help="Open the report in the default browser."),
) -> None:
    """Write OUT/report/index.html: summary, label grids, CLIP scores, embedding map, augmentations."""
    from flows.report.build import build_report

    page = build_report(out, open_browser=open_)
    console.print(f"report: {page}  ({page.as_uri()})")
