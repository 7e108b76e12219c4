"""Scheduled runs: register the pipeline as a Prefect deployment with a cron schedule, and run a worker.

A deployment stores the resolved run config as its parameters; each scheduled run is incremental
(finished shards are skipped, the index is updated) and publishes an artifact summarising what it did.
Deployments need a Prefect server: `prefect server start`, then `PREFECT_API_URL=http://127.0.0.1:4200/api`.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from shardlight.core.config import REPO_ROOT, RunConfig
from shardlight.core.errors import InputError
from shardlight.core.storage import check_output, is_local

DEFAULT_POOL = "shardlight"
ENTRYPOINT = "flows/pipeline.py:pipeline"


def _require_server() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise InputError("deployments need a Prefect server: run `prefect server start` and set "
                         "PREFECT_API_URL=http://127.0.0.1:4200/api")
    return url


async def _ensure_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    async with get_client() as client:
        try:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            pass


def check_cron(cron: str | None) -> None:
    """A cron string Prefect accepts, else one InputError line (before any server is asked)."""
    if cron is None:
        return
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron)
    except ValidationError:
        raise InputError(f"--cron {cron!r} is not a cron schedule: five fields, minute hour day month weekday, "
                         "e.g. \"0 * * * *\" (hourly) or \"*/15 * * * *\"") from None


def _absolute(value: str | None) -> str | None:
    return value if value is None or not is_local(value) or Path(value).is_absolute() else str(Path(value).absolute())


def absolute_paths(cfg: RunConfig) -> tuple[RunConfig, list[str]]:
    """Local relative paths made absolute (a scheduled run starts in another folder); and what changed."""
    changes: dict[str, tuple] = {}

    def fix(where: str, value):
        if isinstance(value, list):
            new = [_absolute(v) for v in value]
        else:
            new = _absolute(value) if isinstance(value, str) else value
        if new != value:
            changes[where] = (value, new)
        return new

    cfg = cfg.model_copy(update={
        "input": fix("input", cfg.input), "output": fix("output", cfg.output),
        "clip": cfg.clip.model_copy(update={"pretrained": fix("clip.pretrained", cfg.clip.pretrained)
                                            if cfg.clip.pretrained and Path(cfg.clip.pretrained).exists()
                                            else cfg.clip.pretrained}),
        "labels": cfg.labels.model_copy(update={
            "checkpoint": fix("labels.checkpoint", cfg.labels.checkpoint),
            "class_names": fix("labels.class_names", cfg.labels.class_names)
            if isinstance(cfg.labels.class_names, str) else cfg.labels.class_names}),
        "augment": cfg.augment.model_copy(update={"checkpoint": fix("augment.checkpoint", cfg.augment.checkpoint),
                                                  "vae": fix("augment.vae", cfg.augment.vae)}),
    })
    return cfg, [f"{k}: {old} → {new}" for k, (old, new) in changes.items()]


def deploy(cfg: RunConfig, name: str, cron: str | None, pool: str = DEFAULT_POOL) -> tuple[str, list[str]]:
    """Register (or update) deployment `shardlight-pipeline/NAME`; returns its full name and the relative
    paths it stored as absolute ones."""
    from prefect import flow

    check_cron(cron)
    if not cfg.input or not cfg.output:
        raise InputError("a deployment needs both `input` and `output` (or --input/--out)")
    check_output(cfg.output)
    cfg, resolved = absolute_paths(cfg)
    _require_server()
    asyncio.run(_ensure_pool(pool))
    source = flow.from_source(source=str(REPO_ROOT), entrypoint=ENTRYPOINT)
    source.deploy(name=name, work_pool_name=pool, cron=cron, parameters={"config": cfg.model_dump()},
                  build=False, push=False, concurrency_limit=1, print_next_steps=False, ignore_warnings=True,
                  description=f"shardlight: {cfg.input} -> {cfg.output}", tags=["shardlight"])
    return f"shardlight-pipeline/{name}", resolved


def start_worker(pool: str = DEFAULT_POOL) -> None:
    """Replace this process with a Prefect process worker polling `pool` (runs the scheduled runs)."""
    _require_server()
    asyncio.run(_ensure_pool(pool))
    prefect = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
    os.execv(sys.executable, prefect)
