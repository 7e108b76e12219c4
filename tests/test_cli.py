"""The console script as a user runs it: one-line errors, never a traceback."""

import os
import re
import subprocess

import numpy as np
import pytest

from tests.conftest import SHARDLIGHT


def run_cli(*args, cwd=None, timeout=120):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([SHARDLIGHT, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def assert_one_line_error(result, expected: str):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr


@pytest.mark.timeout(150)
def test_wrong_config_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("clip:\n  model: shapes-clip\nindex:\n  factroy: Flat\n")
    assert_one_line_error(run_cli("run", str(cfg), "-i", str(tmp_path), "-o", str(tmp_path / "o")),
                          "unknown key 'index.factroy'")


@pytest.mark.timeout(150)
def test_missing_input_and_missing_weights(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("clip:\n  model: shapes-clip\n")
    assert_one_line_error(run_cli("run", str(cfg), "-i", str(tmp_path / "none"), "-o", str(tmp_path / "o")),
                          "input not found")
    cfg.write_text("clip:\n  model: shapes-clip\n  pretrained: /no/such/file.safetensors\n")
    (tmp_path / "00000.tar").write_bytes(b"")
    assert_one_line_error(run_cli("run", str(cfg), "-i", str(tmp_path), "-o", str(tmp_path / "o")),
                          "CLIP weights file not found: /no/such/file.safetensors")


@pytest.mark.timeout(150)
def test_query_without_index(tmp_path):
    assert_one_line_error(run_cli("query", str(tmp_path), "a red circle"), "no index at")


@pytest.mark.timeout(150)
def test_make_demo_data_and_help(tmp_path):
    result = run_cli("make-demo-data", str(tmp_path / "d"), "--shards", "2", "--samples-per-shard", "3",
                     "--seed", "5")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["00000.tar", "00001.tar"]
    helped = run_cli("--help")
    for command in ("run", "query", "demo", "make-demo-data", "index"):
        assert command in helped.stdout


def test_version_short_help_long_k_and_defaults_that_do_not_depend_on_the_cwd():
    from typer.testing import CliRunner

    from flows.cli import app
    from shardlight.core.config import CONFIG_DIR

    runner = CliRunner()
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("shardlight ")
    helped = runner.invoke(app, ["query", "-h"])
    assert helped.exit_code == 0 and "--k" in helped.output and "--image" in helped.output
    train = next(c for c in app.registered_commands if c.name == "train-demo-models").callback
    import inspect

    assert inspect.signature(train).parameters["out_dir"].default.default == CONFIG_DIR / "models"


@pytest.mark.timeout(150)
def test_query_needs_exactly_one_of_text_image_key_named_as_the_cli_spells_them(tmp_path):
    assert_one_line_error(run_cli("query", str(tmp_path), "--k", "3"), "give exactly one of TEXT, --image FILE or --key KEY")

def test_augment_preview_writes_beside_the_report_in_out_whatever_the_cwd(tmp_path, monkeypatch):
    """One convention: both `report` and `augment-preview` write into OUT/report/, never the current directory."""
    from flows.report.preview import preview_path
    from flows.report.summary import report_path

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "elsewhere" / "out"
    assert preview_path(str(out)).resolve().parent == report_path(str(out)).parent == out / "report"


@pytest.mark.timeout(150)
def test_report_and_augment_preview_need_a_run(tmp_path):
    assert_one_line_error(run_cli("report", str(tmp_path)), "no embeddings under")
    assert_one_line_error(run_cli("augment-preview", str(tmp_path), "--dest", str(tmp_path / "p.png")),
                          f"no augmentations under {tmp_path}")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_demo_then_report_then_augment_preview(tmp_path):
    """The three commands a new user runs, as console scripts: the demo, then its report and preview."""
    import pyarrow.parquet as pq
    from PIL import Image

    from tests.conftest import tar_keys

    work = tmp_path / "demo"
    demo = run_cli("demo", "--workdir", str(work), "--shards", "1", "--samples-per-shard", "8", "-k", "3",
                   timeout=1100)
    assert demo.returncode == 0, demo.stderr[-3000:]
    out = work / "out"
    for query in ("a red circle", "a yellow star", "more like", "a red circle (generated only)"):
        assert f"query: {query}" in demo.stdout, demo.stdout[-3000:]
    assert f"outputs in {out}" in demo.stdout
    keys = tar_keys(work / "data" / "00000.tar")
    assert len(keys) == 8 and pq.read_table(out / "embeddings" / "00000.parquet").column("key").to_pylist() == keys
    assert pq.read_metadata(out / "augmented" / "00000.parquet").num_rows > 0

    report = run_cli("report", str(out))
    assert report.returncode == 0, report.stderr
    page = out / "report" / "index.html"
    assert f"report: {page}" in report.stdout.replace("\n", "")
    assert re.search(r"<th>rows</th><td>8</td>", page.read_text())
    # the report's three charts, beside the preview the demo wrote into the same folder
    assert {p.name for p in (out / "report").glob("*.png")} == {"labels.png", "scores.png", "map.png",
                                                               "augment-preview.png"}

    dest = tmp_path / "preview.png"
    preview = run_cli("augment-preview", str(out), "--dest", str(dest), "--per-row", "4")
    assert preview.returncode == 0, preview.stderr
    assert f"wrote {dest}" in preview.stdout.replace("\n", "")
    with Image.open(dest) as img:
        assert img.format == "PNG" and img.width > 0 and np.asarray(img.convert("L")).var() > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_runs_console_has_no_token_notice_or_docs_links_around_its_progress_bar(augmented_cli_run):
    """Ray's "Token authentication is enabled…" notice and Prefect's "See https://…" advice broke the progress
    bar; a run's stderr holds neither, between the bar's first and last frame only the bar and whole log lines,
    and no log line is printed into a frame of the bar."""
    _, done = augmented_cli_run
    pieces = [p.strip() for p in re.split(r"[\r\n]+", done.stderr) if p.strip()]
    foreign = [p for p in pieces if "token authentication" in p.lower() or re.search(r"\bsee https?://", p, re.I)]
    assert not foreign, done.stderr[-3000:]
    bar = [i for i, p in enumerate(pieces) if p.startswith("embedding + augmenting")]
    assert bar, done.stderr[-3000:]
    log_line = re.compile(r"^\d\d:\d\d:\d\d(\.\d+)? \| [A-Z]+ +\| ")  # Prefect's and shardlight's console format
    between = [p for p in pieces[bar[0]:bar[-1] + 1] if not p.startswith("embedding + augmenting")]
    assert all(log_line.match(p) for p in between), between
    assert all(pieces[i].endswith("]") for i in bar), [pieces[i] for i in bar]  # no log line inside a bar's line
