"""`shardlight serve`, `shardlight dedup` and `shardlight index-update`: the index's commands.

Registered on the main app in flows/cli.py with `app.registered_commands += index_app.registered_commands`.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import typer
from rich.console import Console

from index import DEDUP_THRESHOLD

index_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
console = Console()


@index_app.command()
def serve(
    out: str = typer.Argument(..., help="Output folder of a run (with OUT/index)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(1234, min=0, max=65535, help="TCP port (0: any free port; the server's "
                                                             "'Uvicorn running on' line names it)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SHARDLIGHT_API_KEY",
                                          help="Require this key in the X-API-Key header (or $SHARDLIGHT_API_KEY)."),
    name: Optional[str] = typer.Option(None, help="Index name for clip-retrieval clients (default: OUT's name)."),
    max_k: int = typer.Option(1000, min=1, help="Most results one query may ask for."),
) -> None:
    """Serve the index over HTTP: web page at /, JSON at /search, clip-retrieval's /knn-service, docs at /docs."""
    from index.service.http_common import Limits
    from index.service.server import serve as run_server

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    needs_key = " — API key required" if api_key else ""
    where = f"http://{host}:{port}/" if port else f"http://{host} on a free port (named below once bound)"
    console.print(f"serving {out} on {where} (API docs at /docs){needs_key}")
    run_server(out, host=host, port=port, api_key=api_key, index_name=name, limits=Limits(max_k=max_k))


@index_app.command()
def dedup(
    out: str = typer.Argument(..., help="Output folder of a run (with OUT/index)."),
    threshold: float = typer.Option(DEDUP_THRESHOLD, "--threshold", "-t", min=-1.0, max=1.0,
                                    help="Cosine similarity at or above which two images are near-duplicates "
                                         "(docs/index.md says how the default was chosen)."),
    neighbors: int = typer.Option(16, min=1, help="Nearest rows examined per image."),
) -> None:
    """Find groups of near-duplicate images and write them to OUT/dedup/duplicates.parquet."""
    from index.dedup import dedup as find_duplicates

    summary = find_duplicates(out, threshold=threshold, neighbors=neighbors)
    console.print(f"{summary['groups']} group(s), {summary['duplicates']} duplicate(s) among {summary['rows']} "
                  f"images at similarity ≥ {threshold} ({summary['synthetic_members']} group member(s) generated): "
                  f"{summary['path']}")


@index_app.command("index-update")
def index_update(
    out: str = typer.Argument(..., help="Output folder of a run."),
    rebuild_on_drift: bool = typer.Option(False, help="Rebuild instead of adding when the new data has drifted."),
    synthetic: Optional[bool] = typer.Option(
        None, "--synthetic/--no-synthetic",
        help="Index the generated (augmented) rows too, or not; changing it rebuilds. Default: as built."),
    as_json: bool = typer.Option(False, "--json", help="Print the index metadata as JSON."),
    parts: bool = typer.Option(False, "--parts", help="Add the new files as parts on Ray (an index built in parts "
                               "is always updated in parts; without this flag, in this process)."),
    part_rows: int = typer.Option(1_000_000, min=1, help="Rows per part."),
    cpus: Optional[int] = typer.Option(None, min=1, help="CPUs of the local Ray with --parts, the driver's "
                                       "FAISS threads included (default: all)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster for --parts (auto, ray://host:10001)."),
) -> None:
    """Add new shards' embeddings to the index without retraining it (rebuilds when shards changed)."""
    from index.update import update_index

    kwargs = {"rebuild_on_drift": rebuild_on_drift, "synthetic": synthetic, "part_rows": part_rows}
    if parts:
        from flows.index_build import update_on_ray
        from shardlight.core.config import RaySpec

        meta = update_on_ray(out, RaySpec(address=ray_address, num_cpus=cpus), **kwargs)
    else:
        meta = update_index(out, **kwargs)
    if as_json:
        print(json.dumps(meta, indent=2))
        return
    update, drift, tuning = meta["update"], meta.get("drift") or {}, meta.get("tuning") or {}
    measured = tuning.get("qps") and update["mode"] != "unchanged"  # an add or a rebuild measures the speed anew
    console.print(f"index {update['mode']}: {meta['count']} vectors ({meta['factory']})"
                  + (f", +{update['added']}" if update.get("added") else "")
                  + (f" — {update['reason']}" if update.get("reason") else "")
                  + (f"; {tuning['qps']:,.0f} queries/s measured at this size" if measured else ""))
    if drift.get("rebuild_recommended") and update["mode"] == "added":
        console.print(f"[yellow]new data fits the quantizer {drift['ratio']:.2f}× worse than at build time; "
                      f"consider `shardlight index-update {out} --rebuild-on-drift`[/]")
