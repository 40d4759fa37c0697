"""`predict --timeline --plot`: timelines (`VideoClassifier.timeline`) as one PNG, a row per video: a coloured
bar per segment, its class written on it where it fits, under the top score of every window (at its centre).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

# About how many 8-point characters fit across a row of the 10-inch figure: a segment narrower than its
# label would write over its neighbours, so it is named by its colour in the legend only.
CHARS_PER_ROW = 120


def class_colours(timelines: Sequence[dict]) -> dict[str, tuple]:
    """A colour per segment class, in order of first appearance, so that a class has one colour in every row."""
    labels = list(dict.fromkeys(s["label"] for t in timelines for s in t["segments"]))
    palette = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: palette(i % palette.N) for i, label in enumerate(labels)}


def timeline_png(timelines: Sequence[dict], path: str | Path) -> Path:
    """Draw `timelines` ({"video", "windows", "segments"} each) into the PNG at `path`; returns the path."""
    if not timelines:
        raise ValueError(f"{path}: no timelines to plot")
    colours = class_colours(timelines)
    end_s = max(t["windows"][-1]["end_s"] for t in timelines)
    fig = Figure(figsize=(10, 1.0 + 1.5 * len(timelines)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(timelines), 1, sharex=True, squeeze=False)[:, 0]
    for ax, timeline in zip(axes, timelines, strict=True):
        for segment in timeline["segments"]:
            width = segment["end_s"] - segment["start_s"]
            ax.barh(
                0.5,
                width,
                left=segment["start_s"],
                height=1.0,
                color=colours[segment["label"]],
                alpha=0.5,
                edgecolor="white",
                linewidth=1.5,
            )
            if width >= len(segment["label"]) * end_s / CHARS_PER_ROW:
                ax.text(segment["start_s"] + width / 2, 0.06, segment["label"], ha="center", va="bottom", fontsize=8)
        windows = timeline["windows"]
        ax.plot(
            [(w["start_s"] + w["end_s"]) / 2 for w in windows],
            [w["scores"][0] for w in windows],
            color="black",
            linewidth=1.2,
            marker="o",
            markersize=3,
        )
        ax.set_xlim(0, end_s)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("top score", fontsize=8)
        ax.set_title(timeline["video"], loc="left", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("seconds")
    handles = [Patch(facecolor=colour, alpha=0.5, label=label) for label, colour in colours.items()]
    handles.append(
        Line2D([], [], color="black", linewidth=1.2, marker="o", markersize=3, label="top score of each window")
    )
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8, frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
