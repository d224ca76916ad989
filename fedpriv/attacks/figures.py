"""The audit's figures (PNG): reconstructions next to the originals, and log-log ROC curves.

matplotlib is imported lazily, with its file-only Agg backend, so the rest of the audit (and the
library) does not depend on a display or on matplotlib being importable at import time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpriv.errors import FedprivError

log = logging.getLogger(__name__)


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise FedprivError("the audit's figures need matplotlib. Fix: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_image_grid(path: str | Path, rows: list[tuple[str, np.ndarray]], *, title: str = "") -> Path:
    """One row per (label, images in [0, 1] shaped (N, C, H, W)); columns are the batch's images."""
    plt = _pyplot()
    columns = max(len(images) for _, images in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.6 * columns + 1.8, 1.6 * len(rows)),
                                squeeze=False)
    for row, (label, images) in enumerate(rows):
        for column in range(columns):
            axis = axes[row][column]
            axis.set_xticks([])
            axis.set_yticks([])
            if column < len(images):
                image = np.moveaxis(images[column], 0, -1)
                axis.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            else:
                axis.axis("off")
        axes[row][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, plt, path)


@dataclass
class RocPanel:
    """One model's ROC curves and the ceiling its privacy guarantee puts on them."""

    title: str
    curves: dict[str, tuple[np.ndarray, np.ndarray]]  # attack name -> (fpr, tpr)
    ceiling: np.ndarray | None  # TPR ceiling over `grid` (None: no guarantee)
    headline: np.ndarray | None  # the headline (epsilon, delta) line alone
    grid: np.ndarray


def save_roc_plot(path: str | Path, panels: list[RocPanel], *, min_fpr: float) -> Path:
    """Log-log ROC curves, one panel per model, with the DP ceilings drawn over them."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        for name, (fpr, tpr) in panel.curves.items():
            # Log axes cannot show zero: start the curve at the smallest measurable FPR.
            style = "--" if "canaries" in name else "-"  # canaries: a subset, drawn apart from all records
            axis.plot(np.maximum(fpr, min_fpr), np.maximum(tpr, min_fpr), style, label=name, linewidth=1.5)
        axis.plot(panel.grid, panel.grid, color="grey", linestyle=":", label="random guess")
        if panel.headline is not None:
            axis.plot(panel.grid, panel.headline, color="black", linestyle="-.", label="(ε, δ) ceiling")
        if panel.ceiling is not None:
            axis.plot(panel.grid, panel.ceiling, color="red", linewidth=1.2, label="accountant's f-DP ceiling")
        axis.set(xscale="log", yscale="log", xlim=(min_fpr, 1), ylim=(min_fpr, 1.05),
                 xlabel="false-positive rate", ylabel="true-positive rate", title=panel.title)
        axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    return _save(figure, plt, path)


def _save(figure, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    log.info("Wrote %s", path)
    return path
