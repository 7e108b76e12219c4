"""`shardlight dedup` and `shardlight index-update` through their typer commands."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
from index_helpers import clustered, write_shard
from typer.testing import CliRunner

from flows.index_cli import index_app
from index.build import build_index

runner = CliRunner()


def test_index_update_builds_then_adds_then_reports_unchanged(tmp_path):
    write_shard(tmp_path, "00000", clustered(200, 16))
    first = runner.invoke(index_app, ["index-update", str(tmp_path)])
    assert first.exit_code == 0, first.output
    assert "index built: 200 vectors" in first.output
    write_shard(tmp_path, "00001", clustered(50, 16, seed=1))
    added = runner.invoke(index_app, ["index-update", str(tmp_path), "--json"])
    meta = json.loads(added.output)
    assert meta["update"] == {"mode": "added", "added": 50, "shards": 1} and meta["count"] == 250
    same = runner.invoke(index_app, ["index-update", str(tmp_path)])
    assert "unchanged" in same.output


def test_dedup_command_writes_groups(tmp_path):
    x = clustered(100, 16, clusters=100, spread=0.0)  # spread 0: every cluster's rows are identical
    write_shard(tmp_path, "00000", x)
    build_index(str(tmp_path), "Flat")
    result = runner.invoke(index_app, ["dedup", str(tmp_path), "--threshold", "0.999"])
    assert result.exit_code == 0, result.output
    _, counts = np.unique(x.round(5), axis=0, return_counts=True)
    groups, duplicates = int((counts > 1).sum()), int((counts[counts > 1] - 1).sum())
    assert groups > 0 and f"{groups} group(s), {duplicates} duplicate(s) among 100 images" in result.output
    table = pq.read_table(tmp_path / "dedup" / "duplicates.parquet")
    assert table.num_rows == groups + duplicates
    assert table.column("representative").to_pylist().count(True) == groups


def test_index_and_query_choose_generated_rows(tmp_path):
    from flows.cli import app

    write_shard(tmp_path, "00000", clustered(60, 16, seed=1))
    fake = write_shard(tmp_path, "00000", clustered(20, 16, seed=1), folder="augmented", key_prefix="gen",
                       synthetic=[True] * 20)
    built = runner.invoke(app, ["index", str(tmp_path), "--no-synthetic"])
    assert built.exit_code == 0, built.output
    assert "index: 60 vectors (input rows only)" in built.output
    runner.invoke(app, ["index", str(tmp_path)])  # default: generated rows too
    for flag, want in (("--synthetic", True), ("--no-synthetic", False)):
        result = runner.invoke(app, ["query", str(tmp_path), "--key", fake[0], "-k", "8", flag, "--json"])
        assert result.exit_code == 0, result.output
        hits = [json.loads(line) for line in result.output.splitlines()]
        assert len(hits) == 8 and {h["synthetic"] for h in hits} == {want}
