"""The run summary behind the report and the Prefect artifact: computed once, rendered as HTML or markdown.

Every number comes from the run folder itself (Parquet footers, errors files, index meta, run.json), so
the summary also covers shards finished by earlier runs. Only small columns are streamed; embeddings are
never read here.
"""

from __future__ import annotations

import html
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from shardlight.core.layout import num_rows, parquet_files, read_stats, run_record_path
from shardlight.core.storage import exists, join, local_path, open_read, read_bytes

REPORT_DIR = "report"
REPORT_PAGE = "index.html"
TOP_REASONS = 10  # errors are grouped by (stage, reason); the rest are summed into "other"
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


@dataclass(frozen=True)
class Stage:
    """Throughput of one pipeline stage, summed over its shards."""

    name: str
    items: int
    seconds: float  # summed worker time (per-shard seconds) or the stage's wall time

    @property
    def per_s(self) -> float | None:
        return self.items / self.seconds if self.seconds > 0 else None


@dataclass
class RunSummary:
    """What a run folder holds, in the numbers a curator asks for first."""

    out: str
    shards: int = 0  # embeddings files (one per finished input shard)
    samples_read: int = 0
    rows: int = 0  # rows in OUT/embeddings
    errors: int = 0  # dropped samples (rows of OUT/errors with dropped=true)
    notes: int = 0  # recorded problems whose row was kept (bad json, shard damage)
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    synthetic_rows: int = 0  # rows in OUT/augmented
    dedup: dict | None = None  # groups, duplicates (rows beyond one per group), threshold; None: no dedup result
    stages: list[Stage] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    code_version: str | None = None
    finished_at: str | None = None
    index: dict | None = None  # factory, count, dim and any measured recall
    last_run: dict = field(default_factory=dict)  # the last run's own work: processed / skipped / failed shards

    def rows_for_display(self) -> list[tuple[str, str]]:
        """The (name, value) pairs both renderings show, in order."""
        pairs = [("output", self.out), ("shards", f"{self.shards:,}")]
        if self.last_run:
            run = self.last_run
            pairs.append(("last run", f"{run.get('processed', 0):,} shard(s) done, {run.get('skipped', 0):,} skipped, "
                                      f"{len(run.get('failed') or {}):,} failed"))
        pairs += [("samples read", f"{self.samples_read:,}"), ("rows", f"{self.rows:,}"),
                  ("errors (dropped)", f"{self.errors:,}")]
        if self.notes:
            pairs.append(("notes (row kept)", f"{self.notes:,}"))
        pairs.append(("synthetic rows", f"{self.synthetic_rows:,}"))
        if self.dedup is not None:
            threshold = f", cosine ≥ {self.dedup['threshold']}" if self.dedup.get("threshold") is not None else ""
            pairs.append(("near-duplicate groups",
                          f"{self.dedup['groups']:,} ({self.dedup['duplicates']:,} duplicate rows{threshold})"))
        pairs += [(f"throughput: {s.name}", _rate(s)) for s in self.stages]
        pairs += [(f"model: {k}", v) for k, v in self.models.items()]
        if self.index:
            pairs.append(("index", _index_text(self.index)))
        pairs.append(("code version", self.code_version or "unknown"))
        if self.finished_at:
            pairs.append(("finished at", self.finished_at))
        return pairs


def _rate(stage: Stage) -> str:
    if stage.per_s is None:
        return f"{stage.items:,} items"
    return f"{stage.per_s:,.1f}/s ({stage.items:,} in {stage.seconds:,.1f}s)"


def _index_text(index: dict) -> str:
    text = f"{index.get('factory')} · {index.get('count', 0):,} vectors · dim {index.get('dim')}"
    tuning = index.get("tuning") or {}
    if tuning.get("recall_at_k") is not None:  # measured by index/tune.py against exact search
        at = f"@{tuning['k']}" if tuning.get("k") else ""
        text += f" · measured recall{at} {tuning['recall_at_k']:.4f}"
        if tuning.get("param"):
            text += f" ({tuning['param']}={tuning.get('value')})"
        if tuning.get("recall_count") not in (None, index.get("count")):  # index-update re-measures speed only
            text += f" at build, on {tuning['recall_count']:,} vectors (not re-measured after index-update)"
    if tuning.get("qps"):
        text += f" · {tuning['qps']:,.0f} queries/s"
        if tuning.get("speed_count") not in (None, index.get("count")):
            text += f" at {tuning['speed_count']:,} vectors"
        elif tuning.get("recall_count") not in (None, index.get("count")):
            text += " (measured after index-update)"
    for name, value in index.items():  # older or other builders: any top-level recall figure
        if "recall" in name:
            text += f" · {name} {_number(value)}"
    return text


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_number(v)}" for k, v in value.items())
    return str(value)


def _read_json(url: str) -> dict:
    return json.loads(read_bytes(url)) if exists(url) else {}


def _count_errors(out: str) -> tuple[int, int, dict[str, int]]:
    """(dropped, kept, counts by "stage: reason") streamed over OUT/errors."""
    by_reason: Counter = Counter()
    dropped = kept = 0
    for url in parquet_files(out, "errors"):
        with open_read(url) as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=["stage", "reason", "dropped"]):
                for stage, reason, was_dropped in zip(*(batch.column(i).to_pylist() for i in range(3))):
                    reason = _ADDRESS.sub("0x…", reason or "")  # '<_io.BytesIO object at 0x7f…>' varies per row
                    by_reason[f"{stage}: {reason}" + ("" if was_dropped else " (row kept)")] += 1
                    dropped += bool(was_dropped)
                    kept += not was_dropped
    top = dict(by_reason.most_common(TOP_REASONS))
    rest = sum(by_reason.values()) - sum(top.values())
    if rest:
        top["other reasons"] = rest
    return dropped, kept, top


def _stage(name: str, stats: list[dict]) -> Stage | None:
    rows = sum(s.get("rows", 0) for s in stats)
    seconds = sum(s.get("seconds", 0.0) for s in stats)
    return Stage(name, rows, seconds) if stats else None


def _stages(out: str, embed_stats: list[dict], record: dict, index: dict | None) -> list[Stage]:
    stages = [_stage("embed + label (worker time)", embed_stats),
              _stage("augment (worker time)", [read_stats(u) for u in parquet_files(out, "augmented")])]
    run = record.get("summary", {})
    if run.get("images_per_s"):
        stages.append(Stage("embed (wall clock, last run)", run["new_rows"], run["new_rows"] / run["images_per_s"]))
    if index and index.get("build_seconds") is not None:
        stages.append(Stage("index build", index.get("count", 0), index["build_seconds"]))
    return [s for s in stages if s is not None and s.items]


def _weights(value: str | bool | None) -> str | None:
    """A weights file by its name (the full path is in run.json), a pretrained tag as it is."""
    if not value:
        return None
    return "hub weights" if value is True else Path(str(value)).name


def _loaded_dit(out: str, record: dict) -> str | None:
    """The DiT name the workers loaded (a demo checkpoint names its own, whatever `augment.model` says)."""
    files = parquet_files(out, "augmented")
    named = read_stats(files[-1]).get("model") if files else None
    worker = ((record.get("summary") or {}).get("worker") or {}).get("augment") or {}
    return named or worker.get("model")


def _models(record: dict, loaded_dit: str | None = None) -> dict[str, str]:
    """Model names as loaded; the config's names only where nothing loaded says otherwise."""
    cfg = record.get("config", {})
    clip, labels = cfg.get("clip") or {}, cfg.get("labels") or {}
    models = {}
    if clip:
        models["clip"] = f"{clip.get('model')} ({_weights(clip.get('pretrained')) or 'untrained'})"
    if labels and labels.get("kind") != "none":
        weights = _weights(labels.get("checkpoint")) or _weights(labels.get("pretrained"))
        models["labels"] = f"{labels.get('kind')}: {labels.get('model')}" + (f" ({weights})" if weights else "")
    augment = cfg.get("augment") or {}
    if augment.get("enabled") and (loaded_dit or augment.get("model")):
        models["augment"] = f"{loaded_dit or augment['model']} ({_weights(augment.get('checkpoint')) or 'untrained'})"
    return models


def collect_summary(out: str) -> RunSummary:
    """Totals for a run folder, streamed from its Parquet footers and errors files."""
    files = parquet_files(out, "embeddings")
    stats = [read_stats(u) for u in files]
    record = _read_json(run_record_path(out))
    index = _read_json(join(out, "index", "meta.json")) or None
    dropped, kept, by_reason = _count_errors(out)
    dedup = join(out, "dedup", "duplicates.parquet")
    return RunSummary(
        out=out, shards=len(files), samples_read=sum(s.get("samples_read", 0) for s in stats),
        rows=sum(num_rows(u) for u in files), errors=dropped, notes=kept, errors_by_reason=by_reason,
        synthetic_rows=sum(num_rows(u) for u in parquet_files(out, "augmented")),
        dedup=_dedup_counts(dedup) if exists(dedup) else None,
        stages=_stages(out, stats, record, index), models=_models(record, _loaded_dit(out, record)),
        versions=record.get("versions", {}), code_version=record.get("code_version"),
        finished_at=record.get("finished_at"), index=index, last_run=record.get("summary", {}),
    )


def _dedup_counts(url: str) -> dict:
    """Groups and duplicate rows in OUT/dedup/duplicates.parquet, and the threshold it was made with."""
    with open_read(url) as f:
        pf = pq.ParquetFile(f)
        groups = pf.read(columns=["group"]).column("group")
        settings = json.loads((pf.schema_arrow.metadata or {}).get(b"shardlight.dedup", b"{}"))
    count = len(set(groups.to_pylist()))
    return {"groups": count, "duplicates": len(groups) - count, "threshold": settings.get("threshold")}


def report_path(out: str) -> Path:
    return Path(local_path(join(out, REPORT_DIR, REPORT_PAGE))).resolve()


def summary_markdown(out: str, summary: RunSummary | None = None) -> str:
    """The summary as a markdown table for a Prefect artifact, linking to the run's HTML report."""
    s = summary or collect_summary(out)
    page = report_path(out)
    lines = ["| field | value |", "|---|---|"] + [f"| {k} | {_md(v)} |" for k, v in s.rows_for_display()]
    if s.errors_by_reason:
        lines += ["", "| errors by reason | count |", "|---|---:|"]
        lines += [f"| {_md(reason)} | {n:,} |" for reason, n in s.errors_by_reason.items()]
    lines += ["", f"**Report:** [{page}]({page.as_uri()}) — open it with `shardlight report {out} --open`"]
    return "\n".join(lines)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_html(s: RunSummary) -> str:
    """The same summary as HTML tables (run facts, errors by reason, versions)."""
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in s.rows_for_display())
    parts = [f'<table class="facts">{facts}</table>']
    if s.errors_by_reason:
        rows = "".join(f"<tr><td>{html.escape(r)}</td><td class=num>{n:,}</td></tr>"
                       for r, n in s.errors_by_reason.items())
        parts.append(f'<table class="facts"><tr><th>errors by reason</th><th>count</th></tr>{rows}</table>')
    if s.versions:
        text = " · ".join(f"{html.escape(k)} {html.escape(str(v))}" for k, v in s.versions.items())
        parts.append(f'<p class="versions">{text}</p>')
    return "\n".join(parts)
