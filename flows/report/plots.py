"""The report's charts as PNG bytes (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
from collections import Counter

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

TOP_LABELS = 30
MAP_COLOURED = 20  # labels with their own colour on the map; the rest are grey
REAL, SYNTHETIC = "#3b6ea8", "#e08a2c"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def label_bars(real: Counter, synthetic: Counter, top: int = TOP_LABELS) -> bytes:
    """Horizontal bars of the most frequent labels; synthetic rows stacked in a second colour."""
    names = [name for name, _ in (real + synthetic).most_common(top)]
    fig, ax = plt.subplots(figsize=(8, 0.28 * max(len(names), 4) + 1.2))
    y = np.arange(len(names))
    counts = np.array([real[n] for n in names])
    ax.barh(y, counts, color=REAL, label="real")
    if synthetic:
        ax.barh(y, [synthetic[n] for n in names], left=counts, color=SYNTHETIC, label="synthetic")
        ax.legend(loc="lower right")
    totals = [real[n] + synthetic[n] for n in names]
    for yi, total in zip(y, totals):
        ax.text(total, yi, f" {total:,}", va="center", fontsize=7, color="#444")
    ax.set_xlim(0, max(totals, default=1) * 1.12)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    shown = f"top {len(names)} of {len(real + synthetic)}" if len(real + synthetic) > len(names) else "all"
    ax.set_title(f"label distribution ({shown} labels)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def score_histogram(hist: np.ndarray, edges: np.ndarray, bins: int = 40) -> bytes:
    """CLIP image-text cosine scores, re-binned from the fine streamed histogram to the occupied range."""
    fig, ax = plt.subplots(figsize=(8, 3.2))
    occupied = np.flatnonzero(hist)
    if occupied.size:
        lo, hi = occupied[0], occupied[-1] + 1
        groups = np.array_split(np.arange(lo, hi), min(bins, hi - lo))
        counts = [hist[g].sum() for g in groups]
        left = [edges[g[0]] for g in groups]
        width = [edges[g[-1] + 1] - edges[g[0]] for g in groups]
        ax.bar(left, counts, width=width, align="edge", color=REAL, edgecolor="white", linewidth=0.5)
        centres = (edges[:-1] + edges[1:]) / 2
        mean = float((hist * centres).sum() / hist.sum())
        ax.axvline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.3f}")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no captioned rows", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("CLIP score (cosine of image and caption embeddings)")
    ax.set_ylabel("rows")
    ax.set_title(f"image-text agreement ({int(hist.sum()):,} captioned rows)")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def embedding_map(xy: np.ndarray, labels: list[str], synthetic: np.ndarray, method: str) -> bytes:
    """Scatter of the sampled image embeddings, coloured by label; synthetic samples drawn as crosses."""
    fig, ax = plt.subplots(figsize=(9, 7))
    common = [name for name, _ in Counter(labels).most_common(MAP_COLOURED)]
    tab20 = plt.get_cmap("tab20")
    colours = [tab20(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]  # the 10 strong colours first
    labels_arr = np.array(labels, dtype=object)
    rest = ~np.isin(labels_arr, common)
    if rest.any():
        _scatter(ax, xy, rest, synthetic, "#b0b0b0", f"other ({int(rest.sum())})")
    for i, name in enumerate(common):
        _scatter(ax, xy, labels_arr == name, synthetic, colours[i % 20], name)
    if synthetic.any():
        ax.scatter([], [], marker="x", color="black", label="synthetic (×)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False, markerscale=1.5)
    ax.set_title(f"image embeddings, {method} ({len(xy):,} sampled points)")
    ax.set_xticks([])
    ax.set_yticks([])
    return _png(fig)


def _scatter(ax, xy: np.ndarray, mask: np.ndarray, synthetic: np.ndarray, colour, name: str) -> None:
    real, synth = mask & ~synthetic, mask & synthetic
    ax.scatter(xy[real, 0], xy[real, 1], s=14, color=colour, alpha=0.8, linewidths=0, label=name)
    if synth.any():
        ax.scatter(xy[synth, 0], xy[synth, 1], s=22, color=colour, marker="x", linewidths=1.2)
