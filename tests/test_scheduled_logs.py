"""shardlight's INFO lines reach the Prefect run's logs (what the UI shows for a scheduled run), however the
flow was started, and relative paths in a deployment are stored as absolute ones."""

import logging
import time

import pytest

from flows.deploy import absolute_paths, check_cron
from shardlight.core.config import RunConfig
from shardlight.core.errors import InputError


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_shardlight_lines_are_in_the_flow_runs_logs(prefect_server):
    from prefect import flow, get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.pipeline import send_logs_to_prefect

    logger = logging.getLogger("shardlight")
    logger.handlers = [h for h in logger.handlers if not isinstance(h, APILogHandler)]  # as a worker starts it

    @flow(name="logs-probe")
    def probe() -> None:
        send_logs_to_prefect()
        logger.info("3 shard(s) in input: 3 to process, 0 already done")

    run_id = probe(return_state=True).state_details.flow_run_id
    APILogHandler().flush()
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            messages = [entry.message for entry in logs]
            if any("3 to process" in m for m in messages) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert any("3 to process" in m for m in messages), messages


def test_relative_paths_become_absolute_at_deploy_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig(input="data/*.tar", output="out")
    fixed, said = absolute_paths(cfg)
    assert fixed.input == str(tmp_path / "data/*.tar") and fixed.output == str(tmp_path / "out")
    assert said == [f"input: data/*.tar → {tmp_path}/data/*.tar", f"output: out → {tmp_path}/out"]
    assert absolute_paths(fixed)[1] == []  # already absolute: nothing to say
    assert absolute_paths(RunConfig(input="s3://b/{0..9}.tar", output="s3://b/out"))[1] == []


def test_cron_is_checked_before_any_server_is_asked():
    check_cron("0 * * * *")
    with pytest.raises(InputError, match="is not a cron schedule"):
        check_cron("every hour")
