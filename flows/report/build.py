"""The run report: one offline HTML page (`OUT/report/index.html`) with the charts beside it as PNGs.

It shows the run summary, the label distribution with example thumbnails per label, the CLIP score
histogram with the worst- and best-matching pairs, a 2-D map of the image embeddings, and, when those
outputs exist, augmentations and near-duplicate groups. Thumbnails are inlined as small JPEG data URIs.
"""

from __future__ import annotations

import html
import logging
import webbrowser
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from flows.report import plots
from flows.report.data import SCORE_EDGES, Sample, Scan, find_rows, project_2d, scan_run
from flows.report.images import data_uri, read_images
from flows.report.preview import PREVIEW_NAME
from flows.report.summary import RunSummary, collect_summary, report_path, summary_html, summary_markdown
from shardlight.core.errors import InputError
from shardlight.core.storage import exists, is_local, join, open_read

__all__ = ["build_report", "summary_markdown"]
log = logging.getLogger("shardlight")

AUG_SOURCES, AUG_VARIATIONS = 8, 5  # source rows and variations per row in the augmentation grid
AUG_CLASSES, AUG_PER_CLASS = 12, 6  # classes and images per class in the "generated per class" grid
DUP_GROUPS, DUP_MEMBERS = 12, 8  # largest groups shown, members shown per group


@dataclass(frozen=True)
class DupGroup:
    """One near-duplicate group as shown: its id, its full size and the first members, each with a note."""

    name: object
    size: int
    members: list[tuple[Sample, str]]  # (row, "kept" or its similarity)


def build_report(out: str, open_browser: bool = False, summary: RunSummary | None = None) -> Path:
    """Write OUT/report/index.html and its PNGs for a run folder; returns the page's path.

    Args:
        out: the run's output folder (local).
        open_browser: open the page in the default browser afterwards.
        summary: a summary already computed for this folder (the pipeline passes the one it publishes).
    """
    if not is_local(out):
        raise InputError(f"the report needs a local output folder, not {out}")
    if not exists(join(out, "embeddings")):
        raise InputError(f"no embeddings under {join(out, 'embeddings')}: is {out} a run's output folder?")
    page = report_path(out)
    folder = page.parent
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # a chart that no longer applies must not linger (the preview is not one)
        if old.name != PREVIEW_NAME:
            old.unlink()
    summary = summary or collect_summary(out)
    scan = scan_run(out)
    dups = _duplicate_groups(out)
    aug_sources = find_rows(out, {s.source_key for s in scan.augmented if s.source_key}) if scan.augmented else {}
    shown = _samples_shown(scan, dups, aug_sources)
    thumbs = {k: data_uri(v) for k, v in read_images(out, shown, scan.source_urls).items()}
    sections = [_section("Run summary", summary_html(summary)),
                _labels_section(folder, scan, thumbs), _scores_section(folder, scan, thumbs),
                _map_section(folder, scan), _augment_section(scan, aug_sources, thumbs),
                _dedup_section(dups, thumbs)]
    tmp = page.with_name(page.name + ".tmp")
    tmp.write_text(_page(out, [s for s in sections if s]), encoding="utf-8")
    tmp.replace(page)
    log.info("report written to %s", page)
    if open_browser and not webbrowser.open(page.as_uri()):
        log.warning("no browser found to open %s", page.as_uri())
    return page


def _samples_shown(scan: Scan, dups: list[DupGroup], aug_sources: dict) -> list[Sample]:
    """Every row whose thumbnail the page shows, once."""
    top = [name for name, _ in (scan.label_counts + scan.synthetic_label_counts).most_common(plots.TOP_LABELS)]
    groups = [scan.lowest, scan.highest, scan.augmented, list(aug_sources.values()),
              [s for group in dups for s, _ in group.members], [s for name in top for s in scan.examples.get(name, [])]]
    return list({(s.key, s.synthetic): s for group in groups for s in group}.values())


# Sections: each returns its HTML, or "" when there is nothing to show.

def _labels_section(folder: Path, scan: Scan, thumbs: dict) -> str:
    counts = scan.label_counts + scan.synthetic_label_counts
    if not counts:
        return _section("Labels", "<p>No labels in this run (labels.kind: none).</p>")
    _write_png(folder / "labels.png", plots.label_bars(scan.label_counts, scan.synthetic_label_counts))
    rows = []
    for name, n in counts.most_common(plots.TOP_LABELS):
        cells = "".join(_figure(s, thumbs, f"p={s.prob:.2f}" if s.prob is not None else "")
                        for s in scan.examples.get(name, []))
        rows.append(f'<div class="row"><div class="rowhead">{html.escape(name)}<br><small>{n:,} rows</small></div>'
                    f'<div class="grid">{cells}</div></div>')
    return _section("Labels", _img("labels.png", "label distribution")
                    + "<h3>Examples per label (random sample)</h3>" + "".join(rows))


def _scores_section(folder: Path, scan: Scan, thumbs: dict) -> str:
    if not scan.score_hist.sum():
        return ""
    _write_png(folder / "scores.png", plots.score_histogram(scan.score_hist, SCORE_EDGES))
    lowest = "".join(_pair(s, thumbs) for s in scan.lowest)
    highest = "".join(_pair(s, thumbs) for s in scan.highest)
    body = (_img("scores.png", "CLIP score histogram") + '<div class="cols"><div>'
            + "<h3>Lowest-scoring pairs: captions that may not match their image</h3>"
            + f'<table class="pairs">{lowest}</table></div><div>'
            + f'<h3>Highest-scoring pairs</h3><table class="pairs">{highest}</table></div></div>')
    return _section("CLIP image-text scores", body)


def _map_section(folder: Path, scan: Scan) -> str:
    if not scan.map_vectors:
        return ""
    vectors = np.concatenate(scan.map_vectors)
    xy, method = project_2d(vectors)
    synthetic = np.array(scan.map_synthetic, dtype=bool)
    _write_png(folder / "map.png", plots.embedding_map(xy, scan.map_labels, synthetic, method))
    note = (f"<p>{len(vectors):,} image embeddings (every n-th row), projected with {method}; "
            "points are coloured by label and synthetic samples are drawn as crosses.</p>")
    return _section("Embedding map", note + _img("map.png", "embedding map"))


def _augment_section(scan: Scan, sources: dict[str, Sample], thumbs: dict) -> str:
    if not scan.augmented:
        return ""
    by_source: dict[str, list[Sample]] = defaultdict(list)
    by_class: dict[str, list[Sample]] = defaultdict(list)
    for s in scan.augmented:
        if s.source_key:
            by_source[s.source_key].append(s)
        by_class[s.label or "(no label)"].append(s)
    rows = []
    for key, variations in list(by_source.items())[:AUG_SOURCES]:
        source = sources.get(key)
        first = _figure(source or Sample(key=key, shard=""), thumbs, "source")
        cells = "".join(_figure(v, thumbs, html.escape(v.label or "")) for v in variations[:AUG_VARIATIONS])
        rows.append(f'<div class="row"><div class="grid">{first}<span class="arrow">→</span>{cells}</div></div>')
    classes = [f'<div class="row"><div class="rowhead">{html.escape(name)}</div><div class="grid">'
               + "".join(_figure(s, thumbs) for s in samples[:AUG_PER_CLASS]) + "</div></div>"
               for name, samples in sorted(by_class.items())[:AUG_CLASSES]]
    body = (f"<p>{scan.synthetic_label_counts.total():,} synthetic rows (a random sample is shown).</p>"
            + ("<h3>Source → variations</h3>" + "".join(rows) if rows else "")
            + "<h3>Generated per class</h3>" + "".join(classes))
    return _section("Augmentations", body)


def _dedup_section(groups: list[DupGroup], thumbs: dict) -> str:
    if not groups:
        return ""
    rows = []
    for group in groups:
        cells = "".join(_figure(s, thumbs, note) for s, note in group.members)
        head = f"group {html.escape(str(group.name))}<br><small>{group.size:,} members</small>"
        rows.append(f'<div class="row"><div class="rowhead">{head}</div><div class="grid">{cells}</div></div>')
    note = ("<p>The largest groups of near-identical images: the one kept first, then the duplicates, each with "
            "its strongest cosine similarity in the group.</p>")
    return _section("Near-duplicate groups", note + "".join(rows))


def _duplicate_groups(out: str) -> list[DupGroup]:
    """The largest groups in OUT/dedup/duplicates.parquet (written by index/dedup.py), kept row first."""
    url = join(out, "dedup", "duplicates.parquet")
    if not exists(url):
        return []
    with open_read(url) as f:
        pf = pq.ParquetFile(f)
        wanted = ("group", "key", "similarity", "score", "representative")
        table = pf.read(columns=[c for c in wanted if c in pf.schema_arrow.names]).to_pydict()
    n = len(table["key"])
    scores = table.get("similarity") or table.get("score") or [None] * n
    kept = table.get("representative") or [False] * n
    groups: dict = defaultdict(list)
    for group, key, score, representative in zip(table["group"], table["key"], scores, kept):
        note = "kept" if representative else "" if score is None else f"{score:.4f}"
        groups[group].append((not representative, key, note))  # sorts the kept row first
    biggest = sorted(groups.items(), key=lambda item: len(item[1]), reverse=True)[:DUP_GROUPS]
    shown = {name: sorted(members)[:DUP_MEMBERS] for name, members in biggest}
    rows = find_rows(out, {key for members in shown.values() for _, key, _ in members})
    return [DupGroup(name, len(groups[name]), [(rows.get(key) or Sample(key=key, shard=""), note)
                                               for _, key, note in members]) for name, members in shown.items()]


# HTML pieces.

def _figure(s: Sample, thumbs: dict, note: str = "") -> str:
    uri = thumbs.get(s.key)
    tip = html.escape(f"{s.key}: {s.caption or ''}", quote=True)
    image = f'<img src="{uri}" alt="{html.escape(s.key)}">' if uri else '<div class="noimg">no image</div>'
    return f'<figure title="{tip}">{image}<figcaption>{note}</figcaption></figure>'


def _pair(s: Sample, thumbs: dict) -> str:
    return (f"<tr><td>{_figure(s, thumbs)}</td><td class=num>{s.score:.3f}</td>"
            f"<td>{html.escape(s.caption or '')}<br><small>{html.escape(s.key)} · "
            f"label: {html.escape(s.label or '-')}</small></td></tr>")


def _img(name: str, alt: str) -> str:
    return f'<img class="chart" src="{name}" alt="{alt}">'


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def _write_png(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _page(out: str, sections: list[str]) -> str:
    when = datetime.now(UTC).isoformat(timespec="seconds")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>shardlight report: "
            f"{html.escape(out)}</title><style>{_CSS}</style></head><body>"
            f"<h1>shardlight run report</h1><p class=sub>{html.escape(out)} · generated {when}</p>"
            + "\n".join(sections) + "</body></html>")


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;padding:0 16px;color:#222}
h1{margin-bottom:0}.sub{color:#666;margin-top:4px}
section{border-top:1px solid #ddd;margin-top:24px}h3{margin:18px 0 8px;font-size:15px}
table.facts{border-collapse:collapse;margin:8px 16px 8px 0;display:inline-table;vertical-align:top}
table.facts th,table.facts td{border-bottom:1px solid #eee;padding:3px 10px;text-align:left}
table.facts th{color:#555;font-weight:600}.num{text-align:right;font-variant-numeric:tabular-nums}
.versions{color:#666;font-size:12px}img.chart{max-width:100%;display:block;margin:8px 0}
.row{display:flex;align-items:center;margin:4px 0}.rowhead{width:150px;flex:none;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:6px;align-items:center}.arrow{font-size:22px;color:#888}
figure{margin:0;text-align:center;font-size:11px;color:#555}
figure img,.noimg{width:80px;height:80px;object-fit:contain;background:#f3f3f3;border-radius:3px;display:block}
.noimg{display:flex;align-items:center;justify-content:center;color:#999}
table.pairs td{padding:2px 8px;vertical-align:middle;border-bottom:1px solid #f0f0f0}
.cols{display:flex;gap:24px;flex-wrap:wrap}.cols>div{flex:1;min-width:420px}
"""
