"""The Prefect flow: plan shards → embed on Ray → build the index → record the run.

Prefect sequences coarse stages (each a task with retries); Ray does the per-shard work. A shard is
done when its embeddings Parquet exists, so every stage can be re-run and a killed run resumes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from importlib import metadata

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "shardlight")
# The index, report and image commands log through the same logger outside any flow run: there the record
# belongs on the console only, not beside a Prefect "no flow run id" warning.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The temporary local server can take longer than Prefect's 20 s default to start on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from tqdm import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from flows.console import install_console_filters  # noqa: E402
from flows.index_build import build_on_ray, update_on_ray  # noqa: E402
from flows.lease import OutputLease  # noqa: E402
from flows.report.build import build_report  # noqa: E402
from flows.report.summary import collect_summary, summary_markdown  # noqa: E402
from index.build import BuildSpec, build_index, embedding_files, is_current, read_meta  # noqa: E402
from index.update import update_index  # noqa: E402
from shardlight.core.config import RunConfig, parse_config  # noqa: E402
from shardlight.core.errors import InputError, ShardlightError  # noqa: E402
from shardlight.core.layout import (  # noqa: E402
    augment_done,  # noqa: E402
    augmented_path,
    embeddings_path,
    read_stats,
    remove_temporary,
    run_record_path,
    shard_done,  # noqa: E402
    stages_todo,  # noqa: E402
)
from shardlight.core.space import check_space, record_space  # noqa: E402
from shardlight.core.storage import is_local, list_shards, makedirs, shard_name, write_atomic  # noqa: E402
from workers.shard_worker import process_shards  # noqa: E402

log = logging.getLogger("shardlight")


install_console_filters()


def send_logs_to_prefect() -> None:
    """shardlight's log lines go to the Prefect run's logs (the UI) and to this process's stderr.

    PREFECT_LOGGING_EXTRA_LOGGERS (set above) only works when it is set before Prefect configures logging;
    a worker-started run imports Prefect first, so its shardlight lines reached neither the worker's output
    nor the run's logs. Attaching Prefect's API handler at flow start works however the flow was started.
    """
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("shardlight")
    logger.setLevel(min(logger.level or logging.INFO, logging.INFO))
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())
    if not any(type(h) is logging.StreamHandler for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | shardlight - %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.propagate = False


def _retry_unless_expected(task, task_run, state) -> bool:
    """Retry transient failures; a wrong config or a missing model will not fix itself."""
    try:
        state.result()
    except ShardlightError:
        return False
    except Exception:
        return True
    return False


@task(name="plan-shards", retries=2, retry_delay_seconds=2, retry_condition_fn=_retry_unless_expected)
def plan_shards(cfg: RunConfig) -> dict:
    """List input shards and split them into those still to do and those already done."""
    shards = list_shards(cfg.input)
    todo = [s for s in shards if not shard_done(cfg.output, s)]
    log.info("%d shard(s) in input: %d to process, %d already done", len(shards), len(todo), len(shards) - len(todo))
    return {"shards": shards, "todo": todo}


def images_per_s(rows: int, wall_s: float, embed_s: float, augment_s: float) -> float:
    """THE images/s of a run, shown alike by the progress bar and the summary: input rows embedded per second
    of the shard stage's wall time from its first worker being up to its last shard done (starting Ray, the
    actors and their models is `worker_startup_s`; it and their shutdown are in the wall clock, not the rate),
    credited with embedding's share of the actors' work (they also augment). 0.0 when nothing was embedded."""
    work_s = embed_s + augment_s
    embed_wall_s = wall_s * embed_s / work_s if work_s else wall_s
    return round(rows / embed_wall_s, 2) if rows and embed_wall_s > 0 else 0.0


def _console_loggers() -> list[logging.Logger]:
    """The loggers that print to the terminal: the root (Prefect's console handler) and shardlight's own."""
    def to_terminal(handler: logging.Handler) -> bool:
        return isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)
    loggers = [logging.getLogger(), logging.getLogger("shardlight")]
    return [logger for logger in loggers if any(to_terminal(h) for h in logger.handlers)]


class _ShardProgress:
    """A progress bar over shards: rows embedded, images generated (when augmenting) and `images_per_s`.

    While it is shown, console log lines go through `tqdm.write`: printed above the bar, never into its line.
    """

    def __init__(self, desc: str, total: int):
        self._logs = contextlib.ExitStack()
        self._logs.enter_context(logging_redirect_tqdm(loggers=_console_loggers()))
        self.bar = tqdm(total=total, unit="shard", desc=desc, dynamic_ncols=True)
        self.rows, self.generated, self.start = 0, 0, time.perf_counter()  # until `workers_up`
        self.embed_s, self.augment_s = 0.0, 0.0

    def __call__(self, result: dict) -> None:
        embed, augment = result["embed"] or {}, result["augment"] or {}
        self.rows += embed.get("rows", 0)
        self.generated += augment.get("generated", 0)
        self.embed_s += embed.get("seconds", 0.0)
        self.augment_s += augment.get("seconds", 0.0)
        rate = images_per_s(self.rows, time.perf_counter() - self.start, self.embed_s, self.augment_s)
        postfix = {"rows": self.rows, "img_s": f"{rate:.2f}"}
        if self.generated:
            postfix["generated"] = self.generated
        self.bar.set_postfix(postfix)
        self.bar.update(1)

    def workers_up(self) -> None:
        """The rate counts from here: the workers' start-up is not embedding."""
        self.start = time.perf_counter()

    def close(self) -> None:
        self.bar.close()
        self._logs.close()


@task(name="process-shards", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_unless_expected)
def shard_stage(cfg: RunConfig, shards: list[str]) -> tuple[dict, dict]:
    """Embed and label every shard not yet done, and augment it when `augment.enabled`, on one Ray actor
    pool (each actor loads the models once for both); returns (embedded, augmented) results."""
    augment = cfg.augment.enabled
    todo = stages_todo(cfg.output, shards, augment)  # a retried task skips what it finished
    embedded = {"stats": [], "failed": {}, "worker": {}, "seconds": 0.0, "startup_s": 0.0}
    augmented = {"stats": [], "failed": {}}
    if not todo:
        log.info("nothing to do: every shard already has its outputs")
        return embedded, augmented
    progress = _ShardProgress("embedding + augmenting" if augment else "embedding", len(todo))

    def on_done(result: dict) -> None:
        progress(result)
        stats = result["embed"]
        if stats and stats["problem"]:
            log.warning("shard %s: %s", stats["shard"], stats["problem"])
        if result["augment_error"]:
            log.error("augmenting %s failed: %s", result["shard"], result["augment_error"])

    try:
        result = process_shards(cfg, cfg.output, todo, on_done, progress.workers_up)
    finally:
        progress.close()
    for shard, reason in result.failed.items():
        log.error("shard %s failed: %s", shard, reason)
    embedded.update(stats=[r["embed"] for r in result.stats if r["embed"]], failed=result.failed,
                    worker=result.worker, startup_s=result.startup_s, seconds=result.work_s)
    augmented.update(stats=[r["augment"] for r in result.stats if r["augment"]],
                     failed={r["shard"]: r["augment_error"] for r in result.stats if r["augment_error"]})
    if augment:
        log.info("augmented %d shard(s): %d synthetic rows kept", len(augmented["stats"]),
                 sum(s["rows"] for s in augmented["stats"]))
    return embedded, augmented


@task(name="build-index", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_unless_expected)
def index_stage(cfg: RunConfig) -> dict:
    """Bring the FAISS index up to date: nothing when current, add new shards in place, else build."""
    if is_current(cfg.output, cfg.index.factory, cfg.index.synthetic):
        meta = read_meta(cfg.output)
        log.info("index is up to date (%d vectors)", meta["count"])
        return {**meta, "update": {"mode": "unchanged", "added": 0}}
    build = {"train_sample": cfg.index.train_sample, "nprobe": cfg.index.nprobe, "model": cfg.clip.model_dump(),
             "synthetic": cfg.index.synthetic}
    previous = read_meta(cfg.output, missing_ok=True)
    same = previous and cfg.index.factory in (previous.get("requested_factory"), previous.get("factory"))
    if cfg.index.parts:  # parts on Ray (index/parts.py via flows/index_build.py)
        if same:
            meta = update_on_ray(cfg.output, cfg.ray, cfg.index.part_rows, factory=cfg.index.factory, **build)
        else:
            spec = BuildSpec(cfg.index.factory, **build)
            meta = {**build_on_ray(cfg.output, spec, cfg.ray, cfg.index.part_rows), "update": {"mode": "built"}}
    elif same:
        meta = update_index(cfg.output, factory=cfg.index.factory, **build)  # same quantizer, new rows added
    else:
        meta = {**build_index(cfg.output, cfg.index.factory, **build), "update": {"mode": "built"}}
    log.info("index %s: %d vectors (%s)", meta["update"]["mode"], meta["count"], meta["factory"])
    return meta


def _versions() -> dict:
    names = ["shardlight", "torch", "open_clip_torch", "timm", "faiss-cpu", "ray", "prefect", "webdataset",
             "pyarrow"]
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    found["python"] = platform.python_version()
    return found


def _code_version() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def augment_totals(cfg: RunConfig, shards: list[str], augmented: dict) -> dict | None:
    """Totals over every augmented shard's recorded stats; None when the stage is off."""
    if not cfg.augment.enabled:
        return None
    stats = [read_stats(augmented_path(cfg.output, shard_name(s), "parquet")) for s in shards
             if augment_done(cfg.output, s)]
    by_mode = Counter()
    for s in stats:
        by_mode.update(s["by_mode"])
    return {"shards": len(stats), "processed": len(augmented["stats"]), "failed": augmented["failed"],
            **{k: sum(s[k] for s in stats) for k in ("generated", "rows", "dropped_low_clip", "label_agrees")},
            "by_mode": dict(by_mode)}


def summarize(cfg: RunConfig, plan: dict, embedded: dict, index: dict | None, augmented: dict) -> dict:
    """Totals over every shard's recorded stats (this run's and earlier runs')."""
    done = [s for s in plan["shards"] if shard_done(cfg.output, s)]
    stats = [read_stats(embeddings_path(cfg.output, shard_name(s))) for s in done]
    new_rows = sum(s["rows"] for s in embedded["stats"])
    rate = images_per_s(new_rows, embedded["seconds"], sum(s["seconds"] for s in embedded["stats"]),
                        sum(s["seconds"] for s in augmented["stats"]))
    return {
        "shards": len(plan["shards"]), "processed": len(embedded["stats"]),
        "skipped": len(plan["shards"]) - len(plan["todo"]), "failed": embedded["failed"],
        "samples_read": sum(s["samples_read"] for s in stats), "rows": sum(s["rows"] for s in stats),
        "errors": sum(s["errors"] for s in stats), "no_caption": sum(s["no_caption"] for s in stats),
        "shard_problems": {s["shard"]: s["problem"] for s in stats if s.get("problem")},
        "new_rows": new_rows,
        "images_per_s": rate,
        "worker_startup_s": embedded["startup_s"],
        "worker": embedded["worker"],
        "augment": augment_totals(cfg, plan["shards"], augmented),
        "index": None if index is None else {"count": index["count"], "factory": index["factory"],
                                             "fingerprint": index["fingerprint"], "update": index["update"]["mode"]},
    }


@task(name="record-run")
def record_run(cfg: RunConfig, summary: dict, started: str) -> None:
    record = {
        "config": cfg.model_dump(), "summary": summary, "versions": _versions(), "code_version": _code_version(),
        "started_at": started, "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_atomic(run_record_path(cfg.output), json.dumps(record, indent=2, default=str).encode())


@task(name="publish-report", retries=1, retry_delay_seconds=2)
def publish_report(cfg: RunConfig) -> str | None:
    """Write OUT/report/index.html and publish the run summary, linking to it, as a Prefect artifact."""
    if not is_local(cfg.output):
        log.info("no report for %s: the report is written beside local outputs only", cfg.output)
        return None
    facts = collect_summary(cfg.output)  # computed once, rendered as HTML and as markdown
    page = build_report(cfg.output, summary=facts)
    create_markdown_artifact(markdown=summary_markdown(cfg.output, facts), key="shardlight-run-summary",
                             description=f"shardlight run: {cfg.output}")
    return str(page)


@flow(name="shardlight-pipeline", log_prints=True)
def pipeline(config: dict, wait_s: float = 0.0) -> dict:
    """Embed, label and index a WebDataset collection; `config` is a RunConfig as a mapping.

    Only one run at a time may write an output folder: a second one waits up to `wait_s` seconds for
    the first to finish, then refuses.
    """
    send_logs_to_prefect()
    cfg = parse_config(config)
    if not cfg.input or not cfg.output:
        raise InputError("the config needs both `input` and `output` (or --input/--out)")
    started = datetime.now(UTC).isoformat(timespec="seconds")
    makedirs(cfg.output)
    with OutputLease(cfg.output, wait_s=wait_s):
        check_space(cfg.output, cfg.clip, cfg.labels)  # one output, one embedding space
        for path in remove_temporary(cfg.output):  # left by a killed run; ours start after this
            log.info("removed a stale temporary file: %s", path)
        record_space(cfg.output, cfg.clip, cfg.labels)
        plan = plan_shards(cfg)
        embedded, augmented = shard_stage(cfg, plan["shards"])
        index = index_stage(cfg) if cfg.index.build and embedding_files(cfg.output) else None
        summary = summarize(cfg, plan, embedded, index, augmented)
        record_run(cfg, summary, started)
        publish_report(cfg)
    return summary
