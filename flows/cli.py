"""The `shardlight` command line: make data, run the pipeline, query the index, run the demo."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from flows.index_cli import index_app  # noqa: E402
from flows.report.cli import report  # noqa: E402
from shardlight.core.config import CONFIG_DIR, load_config, with_ray_address  # noqa: E402
from shardlight.core.errors import ShardlightError, first_line  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Embed, label and index WebDataset image-text shards with Prefect flows on Ray workers.")
console = Console()
err_console = Console(stderr=True)

DEMO_CONFIG = CONFIG_DIR / "demo.yaml"
DEMO_QUERIES = ("a red circle", "a blue square", "a green triangle", "a yellow star")
_fast_exit = False  # set by commands with nothing to drain at exit (no Prefect): see main()


def _exit_without_finalizing() -> None:
    """Let main() end this command with os._exit after flushing (see its docstring for why)."""
    global _fast_exit
    _fast_exit = True


def _setup_logging(verbose: bool = False) -> None:
    """shardlight's own log lines on stderr, formatted like Prefect's (Prefect also ships them to its API)."""
    logger = logging.getLogger("shardlight")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, logging.StreamHandler) and not hasattr(h, "api") for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d | %(levelname)-7s | shardlight - %(message)s",
                                               datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    logger.propagate = False


@app.command("make-demo-data")
def make_demo_data(
    out: Path = typer.Argument(..., help="Folder to write 00000.tar, 00001.tar, …"),
    shards: int = typer.Option(4, min=1, help="Number of tar shards."),
    samples_per_shard: int = typer.Option(64, min=1, help="Samples in each shard."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes the same samples."),
    image_size: int = typer.Option(64, min=16, help="Width and height of the rendered images."),
) -> None:
    """Write a synthetic image-text WebDataset (img2dataset layout: KEY.jpg, KEY.txt, KEY.json)."""
    from shardlight.training.synthetic import write_shards

    paths = write_shards(out, shards, samples_per_shard, seed, image_size)
    console.print(f"wrote {len(paths)} shard(s) × {samples_per_shard} samples to {out}")


@app.command()
def run(
    config: Path = typer.Argument(..., help="Run config YAML (see configs/demo.yaml)."),
    input: Optional[str] = typer.Option(None, "--input", "-i", help="Shards: path, dir, glob, {a..b} or URL."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output folder or URL."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (auto, ray://host:10001)."),
    wait: float = typer.Option(0.0, help="Seconds to wait when another run holds the output (else refuse)."),
) -> None:
    """Embed, label and index the input shards (resumes: finished shards are skipped)."""
    cfg = with_ray_address(load_config(config, input=input, output=out), ray_address)
    summary = run_pipeline(cfg, wait_s=wait)
    if summary["failed"]:
        raise typer.Exit(1)


def run_pipeline(cfg, wait_s: float = 0.0) -> dict:
    """Check inputs up front (one-line errors), then run the Prefect flow and print its summary."""
    from flows.ahead import started_ahead
    from flows.interrupt import stop_cleanly_on_interrupt
    from shardlight.core.space import check_space
    from shardlight.core.storage import check_output, list_shards
    from shardlight.models.weights import check_augment_files, check_weight_files

    _setup_logging()
    if not cfg.input or not cfg.output:
        raise ShardlightError("the config needs both `input` and `output` (or --input/--out)")
    check_output(cfg.output)  # fail fast on a wrong input, output or weights file, before any service starts
    list_shards(cfg.input)
    check_weight_files(cfg.clip, cfg.labels)
    check_augment_files(cfg.augment)
    check_space(cfg.output, cfg.clip, cfg.labels)
    with stop_cleanly_on_interrupt(cfg.output), started_ahead(cfg):
        from flows.pipeline import pipeline  # imported by started_ahead, after the actors were started

        summary = pipeline(cfg.model_dump(), wait_s=wait_s)
    _print_summary(summary)
    return summary


def _print_summary(s: dict) -> None:
    if s["processed"] == 0 and not s["failed"] and not (s.get("augment") or {}).get("processed"):
        console.print(f"[bold]nothing to do:[/] all {s['shards']} shard(s) were already processed")
    table = Table(title="run summary", show_header=False)
    for name in ("shards", "processed", "skipped", "samples_read", "rows", "errors", "no_caption", "images_per_s",
                 "worker_startup_s"):
        table.add_row(name, str(s[name]))
    aug = s.get("augment")
    if aug:
        modes = ", ".join(f"{mode} {n}" for mode, n in sorted(aug["by_mode"].items()))
        agree = f"; ViT agrees with the target class on {aug['label_agrees'] / aug['rows']:.0%}" if aug["rows"] else ""
        table.add_row("synthetic rows", f"{aug['rows']} kept of {aug['generated']} generated ({modes}; "
                                        f"{aug['dropped_low_clip']} under min_clip_score){agree}")
    if s["index"]:
        table.add_row("index", f"{s['index']['count']} vectors ({s['index']['factory']})")
    console.print(table)
    for shard, reason in (aug or {}).get("failed", {}).items():
        err_console.print(f"[red]augmenting failed[/] {shard}: {reason}")
    for shard, problem in s["shard_problems"].items():
        console.print(f"[yellow]shard {shard}:[/] {problem}")
    for shard, reason in s["failed"].items():
        err_console.print(f"[red]failed[/] {shard}: {reason}")


@app.command()
def index(
    out: str = typer.Argument(..., help="Output folder of a run."),
    factory: str = typer.Option("Flat", help="FAISS index_factory string, or 'auto' (chosen by size and memory)."),
    synthetic: bool = typer.Option(True, "--synthetic/--no-synthetic",
                                   help="Also index the DiT-generated rows (OUT/augmented)."),
    parts: bool = typer.Option(False, "--parts", help="Build an IVF index in parts on Ray (train once, add groups "
                               "of files in parallel tasks, merge the inverted lists on disk)."),
    part_rows: int = typer.Option(1_000_000, min=1, help="Rows per part with --parts."),
    cpus: Optional[int] = typer.Option(None, min=1, help="CPUs of the local Ray with --parts (default: all)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster for --parts (auto, ray://host:10001)."),
) -> None:
    """Rebuild the FAISS index from the Parquet files (OUT/embeddings, and OUT/augmented unless --no-synthetic)."""
    from index.build import BuildSpec, build_index
    from shardlight.core.config import RaySpec
    from shardlight.core.space import recorded_clip

    _exit_without_finalizing()
    if parts:
        from flows.index_build import build_on_ray

        spec = BuildSpec(factory, synthetic=synthetic, model=recorded_clip(out))
        meta = build_on_ray(out, spec, RaySpec(address=ray_address, num_cpus=cpus), part_rows)
    else:
        meta = build_index(out, factory, synthetic=synthetic, model=recorded_clip(out))
    generated = "" if synthetic else " (input rows only)"
    built = f", {meta['parts']['count']} parts merged {meta['parts']['merged']}" if meta.get("parts") else ""
    console.print(f"index: {meta['count']} vectors{generated}, {meta['factory']}, built in {meta['build_seconds']}s"
                  + built)


@app.command()
def query(
    out: str = typer.Argument(..., help="Output folder of a run."),
    text: Optional[str] = typer.Argument(None, help="Text query."),
    k: int = typer.Option(10, "-k", "--k", min=1, help="Number of results."),
    image: Optional[Path] = typer.Option(None, help="Query by this image file instead of text."),
    key: Optional[str] = typer.Option(None, help="Query by an indexed sample's key (more like this)."),
    label: Optional[str] = typer.Option(None, help="Keep only results with this label."),
    synthetic: Optional[bool] = typer.Option(None, "--synthetic/--no-synthetic",
                                             help="Keep only DiT-generated rows, or only input rows (default: both)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """Nearest samples to a text, an image or an existing key."""
    from index.search import Searcher

    _exit_without_finalizing()
    given = [name for name, value in (("TEXT", text), ("--image", image), ("--key", key)) if value is not None]
    if len(given) != 1:
        raise ShardlightError(f"give exactly one of TEXT, --image FILE or --key KEY (got {', '.join(given) or 'none'})")
    hits = Searcher(out).search(text=text, image=image, key=key, k=k, label=label, synthetic=synthetic)
    if as_json:
        for hit in hits:
            print(json.dumps(hit.to_dict()))
        return
    _print_hits(text or str(image or key), hits)


def _print_hits(title: str, hits: list) -> None:
    table = Table(title=f"query: {title}")
    for col in ("#", "key", "score", "label", "caption"):
        table.add_column(col)
    for i, h in enumerate(hits, 1):
        label = f"{h.label} ({h.label_prob:.2f})" if h.label else "-"
        caption = "[dim](DiT-generated)[/]" if h.synthetic else h.caption or ""
        table.add_row(str(i), h.key, f"{h.score:.3f}", label, caption)
    console.print(table)


@app.command("augment-preview")
def augment_preview(
    out: str = typer.Argument(..., help="Output folder of a run with augmentations."),
    dest: Optional[Path] = typer.Option(None, help="PNG to write (default: OUT/report/augment-preview.png, beside "
                                                   "the report)."),
    per_row: int = typer.Option(8, min=1, help="Images per row."),
) -> None:
    """A PNG grid of the DiT augmentations: rows = classes; `vary` sources beside their variations."""
    from flows.report.preview import augment_preview as preview
    from flows.report.preview import preview_path

    try:
        path = preview(out, dest or preview_path(out), per_row)
    except FileNotFoundError as err:
        raise ShardlightError(f"no augmentations under {out}: {err}") from None
    console.print(f"wrote {path}")


@app.command("train-demo-models")
def train_demo_models(
    out_dir: Path = typer.Argument(CONFIG_DIR / "models", show_default="the repo's configs/models",
                                   help="Where weights and model cards go."),
    vit: bool = typer.Option(True, help="Train the ViT classifier (first: CLIP's image tower starts from it)."),
    clip: bool = typer.Option(True, help="Train the CLIP model."),
    ae: bool = typer.Option(True, help="Train the autoencoder of the latent DiT (on the CPU; judged by the ViT)."),
    dit: bool = typer.Option(True, help="Train the class-conditional DiT (after the ViT and CLIP it is scored with)."),
    latent_dit: bool = typer.Option(False, help="Train the latent DiT on the autoencoder's latents (in OUT_DIR or "
                                                "configs/models)."),
    quick: bool = typer.Option(False, help="A few steps only: a smoke test, not usable models."),
    threads: int = typer.Option(2, min=1, help="torch CPU threads."),
    dit_device: str = typer.Option("auto", help="DiT training device: auto (a CUDA GPU when present, with "
                                                 "its larger recipe), cpu or cuda."),
    checkpoint_every: int = typer.Option(250, min=1, help="DiT steps between saves of the training state "
                                         "(OUT_DIR/NAME.train-state.pt); run again to resume a stopped run."),
) -> None:
    """Regenerate the demo data and train the demo models (ViT, CLIP and autoencoder on CPU, the DiTs on CPU or
    GPU), with held-out metrics in model cards."""
    from shardlight.training.demo_dit import train_demo_dit
    from shardlight.training.demo_models import train_demo_models as train
    from shardlight.training.train_autoencoder import train_demo_autoencoder

    results = train(out_dir, clip=clip, vit=vit, quick=quick, threads=threads) if (clip or vit) else {}
    if ae:
        results["autoencoder"] = train_demo_autoencoder(out_dir, quick=quick)
    if dit:
        results["dit"] = train_demo_dit(out_dir, quick=quick, device=dit_device,
                                         checkpoint_every=checkpoint_every)
    if latent_dit:
        results["latent-dit"] = train_demo_dit(out_dir, quick=quick, device=dit_device, latent=True,
                                                checkpoint_every=checkpoint_every)
    for name, metrics in results.items():
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        console.print(f"[bold]{name}[/]: {shown}")
    console.print(f"weights and model cards in {out_dir}")


@app.command()
def deploy(
    config: Path = typer.Argument(..., help="Run config YAML."),
    name: str = typer.Option(..., "--name", help="Deployment name (shardlight-pipeline/NAME)."),
    cron: Optional[str] = typer.Option(None, help='Cron schedule, e.g. "0 * * * *" (hourly).'),
    input: Optional[str] = typer.Option(None, "--input", "-i", help="Shards to watch (new ones get processed)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output folder or URL."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address for the scheduled runs."),
    pool: str = typer.Option("shardlight", help="Prefect work pool (a process pool, created if missing)."),
) -> None:
    """Register a scheduled Prefect deployment of the pipeline (needs PREFECT_API_URL)."""
    from flows.deploy import deploy as register

    cfg = with_ray_address(load_config(config, input=input, output=out), ray_address)
    full, resolved = register(cfg, name, cron, pool)
    for change in resolved:
        console.print(f"stored as an absolute path (scheduled runs start elsewhere): {change}")
    console.print(f"deployment {full} registered{f' on {cron!r}' if cron else ''} in work pool {pool!r}\n"
                  f"run the scheduled runs with: shardlight worker --pool {pool}\n"
                  f"trigger one now with:       prefect deployment run '{full}'")


@app.command()
def worker(pool: str = typer.Option("shardlight", help="Prefect work pool to poll.")) -> None:
    """Run a Prefect worker that executes the scheduled pipeline runs (needs PREFECT_API_URL)."""
    from flows.deploy import start_worker

    start_worker(pool)


app.command()(report)


@app.command()
def demo(
    workdir: Path = typer.Option(Path("demo-out"), help="Where demo data and outputs go."),
    shards: int = typer.Option(4, min=1, help="Demo shards to generate."),
    samples_per_shard: int = typer.Option(96, min=1, help="Samples per demo shard."),
    k: int = typer.Option(5, "-k", "--k", min=1, help="Results per example query."),
) -> None:
    """Make demo data, run the whole pipeline with configs/demo.yaml, and show example queries."""
    from index.search import Searcher
    from shardlight.training.synthetic import write_shards

    data = workdir / "data"
    if not any(data.glob("*.tar")):
        write_shards(data, shards, samples_per_shard, seed=1234)
    cfg = load_config(DEMO_CONFIG, input=str(data), output=str(workdir / "out"))
    run_pipeline(cfg)
    searcher = Searcher(cfg.output)
    for text in DEMO_QUERIES:
        _print_hits(text, searcher.search(text=text, k=k))
    first = searcher.keys[0]
    _print_hits(f"more like {first}", searcher.search(key=first, k=k))
    if cfg.augment.enabled:
        from flows.report.preview import augment_preview as preview
        from flows.report.preview import preview_path

        _print_hits(f"{DEMO_QUERIES[0]} (generated only)", searcher.search(text=DEMO_QUERIES[0], k=k, synthetic=True))
        console.print(f"DiT augmentations: {preview(cfg.output, preview_path(cfg.output))}")
    console.print(f"outputs in {cfg.output}; try: shardlight query {cfg.output} \"a purple square\"")


app.registered_commands += index_app.registered_commands


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"shardlight {version('shardlight')}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                          help="Print the version and exit.")) -> None:
    """Embed, label and index WebDataset image-text shards with Prefect flows on Ray workers."""


def _run_app() -> int:
    """Run the command; expected failures print one line, not a traceback. Returns the exit status."""
    try:
        app()
    except SystemExit as done:  # typer ends every command this way
        if done.code is None or isinstance(done.code, int):
            return done.code or 0
        err_console.print(str(done.code), highlight=False, soft_wrap=True)
        return 1
    except ShardlightError as err:
        err_console.print(f"[red]error:[/] {err}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted; run the same command to resume")
        return 130
    except Exception as err:  # a bug or an outage, not a user error: keep it to one line unless asked
        if os.environ.get("SHARDLIGHT_DEBUG"):
            raise
        err_console.print(f"[red]unexpected error:[/] {first_line(err)} "
                          "(set SHARDLIGHT_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
        return 1
    return 0


def main() -> None:
    """Console entry point. Commands that never start Prefect (query, index, …) end with `os._exit` once
    their output is flushed: on a loaded machine, pyarrow's and torch's native worker threads could still be
    unwinding while the interpreter finalises, and the C++ runtime then aborted the process ("terminate
    called without an active exception", signal 6) after it had printed a correct answer."""
    code = _run_app()
    if _fast_exit:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe (`| head`): nothing more to deliver
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
