"""Scheduled runs: register the pipeline as a Prefect deployment with a cron schedule, and run a worker.

A deployment stores the resolved run config as its parameters; each scheduled run is incremental
(finished shards are skipped, the index is updated) and publishes an artifact summarising what it did.
Deployments need a Prefect server: `prefect server start`, then `PREFECT_API_URL=http://127.0.0.1:4200/api`.
"""

from __future__ import annotations

import asyncio
import os
import sys

from shardlight.core.config import REPO_ROOT, RunConfig
from shardlight.core.errors import InputError

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


def deploy(cfg: RunConfig, name: str, cron: str | None, pool: str = DEFAULT_POOL) -> str:
    """Register (or update) deployment `shardlight-pipeline/NAME`; returns its full name."""
    from prefect import flow

    _require_server()
    if not cfg.input or not cfg.output:
        raise InputError("a deployment needs both `input` and `output` (or --input/--out)")
    asyncio.run(_ensure_pool(pool))
    source = flow.from_source(source=str(REPO_ROOT), entrypoint=ENTRYPOINT)
    source.deploy(name=name, work_pool_name=pool, cron=cron, parameters={"config": cfg.model_dump()},
                  build=False, push=False, concurrency_limit=1, print_next_steps=False, ignore_warnings=True,
                  description=f"shardlight: {cfg.input} -> {cfg.output}", tags=["shardlight"])
    return f"shardlight-pipeline/{name}"


def start_worker(pool: str = DEFAULT_POOL) -> None:
    """Replace this process with a Prefect process worker polling `pool` (runs the scheduled runs)."""
    _require_server()
    asyncio.run(_ensure_pool(pool))
    prefect = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
    os.execv(sys.executable, prefect)
