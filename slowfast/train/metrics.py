"""Accuracy: top-k counts per batch, multi-view video-level evaluation, and the plots logged with a run.

Multi-view testing as in the paper and PySlowFast's TestMeter: every view (temporal clip x spatial crop)
of a video is scored, the softmax probabilities are averaged per video, and the video is classified by
the average. (The reference's default `ENSEMBLE_METHOD: sum` adds them: same argmax, same accuracy.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch


class MetricsError(ValueError):
    """Views or results that cannot be combined: conflicting labels, class counts or repeated views."""


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """{k: how many rows have their label among the k highest logits}. k is capped at the class count,
    so top-5 over 3 classes counts every row."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    num_classes = logits.shape[-1]
    top = logits.topk(min(max(ks), num_classes), dim=-1).indices
    hit = top == labels.reshape(-1, 1)
    return {k: int(hit[:, : min(k, num_classes)].any(dim=1).sum()) for k in ks}


class VideoAggregator:
    """Averages view-level softmax scores per video; views may arrive in any order, batch or worker.

    Each worker adds its views; partial aggregators combine with `merge` or `from_state_dicts`, and
    `results` gives the video-level figures. With `view_ids` (e.g. clip_index * spatial_crops + crop),
    a view seen twice is counted once (a retried batch must not weigh double).
    """

    def __init__(self):
        self.num_classes: int | None = None
        self.duplicate_views = 0
        self._label: dict[str, int] = {}
        self._score_sum: dict[str, np.ndarray] = {}
        self._views: dict[str, int] = {}
        self._view_ids: dict[str, set[int]] = {}

    def __len__(self) -> int:
        return len(self._label)

    def add(self, video_ids: Sequence[str], labels, logits, view_ids=None) -> None:
        """One batch of views: video_ids (B,), labels (B,), logits (B, num_classes), view_ids (B,) or None."""
        probs = torch.softmax(torch.as_tensor(logits).detach().float(), dim=-1).double().cpu().numpy()
        labels = _ints(labels)
        views = _ints(view_ids) if view_ids is not None else [None] * len(labels)
        if not len(video_ids) == len(labels) == len(probs) == len(views):
            raise MetricsError(
                f"batch lengths differ: {len(video_ids)} video ids, {len(labels)} labels, "
                f"{len(probs)} rows of logits, {len(views)} view ids"
            )
        self._check_classes(probs.shape[-1])
        for video, label, p, view in zip(video_ids, labels, probs, views, strict=True):
            video = str(video)
            if view is not None:
                seen = self._view_ids.setdefault(video, set())
                if view in seen:
                    self.duplicate_views += 1
                    continue
                seen.add(view)
            self._add_video(video, label, p, 1)

    def merge(self, other: VideoAggregator) -> VideoAggregator:
        """Fold another partial aggregator into this one (in place); returns self."""
        if other.num_classes is not None:
            self._check_classes(other.num_classes)
        for video, label in other._label.items():
            mine, theirs = self._view_ids.get(video, set()), other._view_ids.get(video, set())
            if mine & theirs:
                raise MetricsError(
                    f"video {video!r}: views {sorted(mine & theirs)} were scored by both "
                    "partial aggregators; each view must be evaluated by exactly one worker"
                )
            if theirs:
                self._view_ids[video] = mine | theirs
            self._add_video(video, label, other._score_sum[video], other._views[video])
        self.duplicate_views += other.duplicate_views
        return self

    def state_dict(self) -> dict:
        """Plain lists and one float64 array: picklable, for sending partial results between workers."""
        videos = list(self._label)
        return {
            "num_classes": self.num_classes,
            "duplicate_views": self.duplicate_views,
            "video_ids": videos,
            "labels": [self._label[v] for v in videos],
            "views": [self._views[v] for v in videos],
            "view_ids": [sorted(self._view_ids.get(v, ())) for v in videos],
            "score_sum": (
                np.stack([self._score_sum[v] for v in videos]) if videos else np.zeros((0, self.num_classes or 0))
            ),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> VideoAggregator:
        agg = cls()
        agg.num_classes, agg.duplicate_views = state["num_classes"], state["duplicate_views"]
        for i, video in enumerate(state["video_ids"]):
            agg._label[video] = int(state["labels"][i])
            agg._views[video] = int(state["views"][i])
            agg._score_sum[video] = np.array(state["score_sum"][i], dtype=np.float64)
            if state["view_ids"][i]:
                agg._view_ids[video] = set(state["view_ids"][i])
        return agg

    @classmethod
    def from_state_dicts(cls, states: Iterable[dict]) -> VideoAggregator:
        """One aggregator from the partial states of several workers."""
        total = cls()
        for state in states:
            total.merge(cls.from_state_dict(state))
        return total

    def video_scores(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(video ids sorted, labels (V,), mean softmax probabilities (V, num_classes))."""
        videos = sorted(self._label)
        labels = np.array([self._label[v] for v in videos], dtype=np.int64)
        probs = np.stack([self._score_sum[v] / self._views[v] for v in videos]) if videos else np.zeros((0, 0))
        return videos, labels, probs

    def results(self, num_classes: int, class_names: Sequence[str] | None = None) -> dict:
        """Video-level figures, as plain Python values (JSON-ready).

        top1, top5, mean_class_accuracy: fractions in [0, 1]; mean_class_accuracy averages the classes
        that have at least one video. per_class: one entry per class. confusion[true][predicted]: counts.
        views_per_video: min and max; both equal to temporal views x spatial crops when nothing is missing.
        """
        if not self._label:
            raise MetricsError("no videos were aggregated; nothing to evaluate")
        if self.num_classes != num_classes:
            raise MetricsError(f"scores have {self.num_classes} classes, results asked for {num_classes}")
        names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        if len(names) != num_classes:
            raise MetricsError(f"{len(names)} class names for {num_classes} classes")
        videos, labels, probs = self.video_scores()
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if len(bad):
            raise MetricsError(f"labels {sorted(set(bad.tolist()))[:10]} are outside 0..{num_classes - 1}")
        # Stable sort: ties go to the lower class index, the same choice argmax makes.
        ranked = np.argsort(-probs, axis=1, kind="stable")[:, : min(5, num_classes)]
        predicted = ranked[:, 0]
        confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(confusion, (labels, predicted), 1)
        per_video = confusion.sum(axis=1)
        correct = np.diag(confusion)
        per_class = [
            {
                "index": c,
                "name": names[c],
                "videos": int(per_video[c]),
                "correct": int(correct[c]),
                "accuracy": float(correct[c] / per_video[c]) if per_video[c] else None,
            }
            for c in range(num_classes)
        ]
        present = per_video > 0
        views = np.array([self._views[v] for v in videos])
        return {
            "num_videos": len(videos),
            "top1": float((predicted == labels).mean()),
            "top5": float((ranked == labels[:, None]).any(axis=1).mean()),
            "mean_class_accuracy": float((correct[present] / per_video[present]).mean()),
            "per_class": per_class,
            "confusion": confusion.tolist(),
            "views_per_video": {"min": int(views.min()), "max": int(views.max())},
            "duplicate_views": self.duplicate_views,
        }

    def _check_classes(self, num_classes: int) -> None:
        if self.num_classes is None:
            self.num_classes = num_classes
        elif self.num_classes != num_classes:
            raise MetricsError(f"scores with {num_classes} classes cannot join scores with {self.num_classes}")

    def _add_video(self, video: str, label: int, score_sum: np.ndarray, views: int) -> None:
        if video in self._label:
            if self._label[video] != label:
                raise MetricsError(f"video {video!r}: one view says label {label}, another said {self._label[video]}")
            self._score_sum[video] = self._score_sum[video] + score_sum
            self._views[video] += views
        else:
            self._label[video] = label
            self._score_sum[video] = np.array(score_sum, dtype=np.float64)
            self._views[video] = views


def _ints(values) -> list[int]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    return [int(v) for v in values]


# --- plots for the run's artifacts -------------------------------------------------------------------


def confusion_matrix_png(confusion, class_names: Sequence[str] | None, path: str | Path) -> Path:
    """The confusion matrix, rows = true class, coloured by the share of each true class (counts written
    in the cells when there are few classes); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(confusion, dtype=np.int64)
    n = counts.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)

    side = float(np.clip(2.5 + (0.45 if n <= 30 else 0.25) * n, 5, 20))  # room for the cells' counts
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    if n <= 30:
        for t in range(n):
            for p in range(n):
                if counts[t, p]:
                    ax.text(
                        p,
                        t,
                        str(counts[t, p]),
                        ha="center",
                        va="center",
                        fontsize=9,
                        color="white" if share[t, p] > 0.5 else "black",
                    )
    if n <= 60:
        ax.set_xticks(
            range(n),
            names,
            rotation=90 if n > 8 else 45,
            ha="center" if n > 8 else "right",
            fontsize=9 if n <= 30 else 7,
        )
        ax.set_yticks(range(n), names, fontsize=9 if n <= 30 else 7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"{counts.sum()} videos, top-1 {accuracy:.1%}")
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


# Which panel each history key goes to; keys matching none are not plotted.
_PANELS = (
    ("loss", lambda k: "loss" in k),
    ("accuracy", lambda k: "top" in k or "acc" in k),
    ("learning rate", lambda k: k == "lr"),
)


def learning_curve_png(history: Sequence[dict], path: str | Path) -> Path:
    """Loss, accuracy and LR against epoch, one panel each, from per-epoch records such as
    `{"epoch": 3, "train_loss": 1.2, "val_loss": 1.4, "val_top1": 0.61, "lr": 0.09}`.
    A key may be missing from some records (validation every few epochs); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = sorted({k for record in history for k in record if k != "epoch"})
    panels = [(title, [k for k in keys if belongs(k)]) for title, belongs in _PANELS]
    panels = [(title, ks) for title, ks in panels if ks]
    if not panels:
        raise ValueError(f"nothing to plot: history keys {keys} have no loss, accuracy or lr")
    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (title, ks) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for k in ks:
            points = [(r["epoch"], r[k]) for r in history if r.get(k) is not None]
            if not points:
                continue
            x, y = zip(*points, strict=True)
            ax.plot(x, y, marker="o" if len(points) <= 30 else None, markersize=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if title == "accuracy":
            ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(ks) > 1:
            ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
