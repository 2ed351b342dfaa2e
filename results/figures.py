"""The report's figures (matplotlib, no display): each function takes prepared pandas data and
returns a Figure; `save` writes it as PNG (for the page) and PDF (for papers).

Colours come from matplotlib's colour-blind-safe `tab10` / `viridis`; every figure carries its
counts (cells, seeds, negatives) in its title or legend, never only in the caption."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

plt.rcParams.update(
    {
        "figure.dpi": 100,
        "savefig.dpi": 120,
        "font.size": 9,
        "axes.titlesize": 10,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "pdf.fonttype": 42,  # TrueType in the PDF: editable text for papers
    }
)

WRAP = 70  # characters of a title line


def _wrap(text: str, width: int = WRAP) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join([*lines, line])


def save(fig: Figure, folder: Path, name: str) -> str:
    """Write `name`.png and `name`.pdf under `folder`; returns the PNG's file name."""
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / f"{name}.png", bbox_inches="tight")
    fig.savefig(folder / f"{name}.pdf", bbox_inches="tight")
    plt.close(fig)
    return f"{name}.png"


def heatmap(
    values: pd.DataFrame, notes: pd.DataFrame, title: str, colour_label: str
) -> Figure:
    """Rows x columns coloured by `values` (0..1), each cell printed with its `notes` text."""
    n_rows, n_cols = values.shape
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * n_cols + 2.5), max(2.2, 0.5 * n_rows + 1.4)))
    data = values.to_numpy(dtype=float)
    image = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(n_cols), [_wrap(str(c), 18) for c in values.columns], rotation=30,
                  ha="right")  # fmt: skip
    ax.set_yticks(range(n_rows), [str(r) for r in values.index])
    for i in range(n_rows):
        for j in range(n_cols):
            text = notes.iat[i, j]
            if not isinstance(text, str) or not text:
                continue
            dark = not math.isnan(data[i, j]) and data[i, j] > 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    color="black" if dark else "white")  # fmt: skip
    ax.spines[:].set_visible(False)
    fig.colorbar(image, ax=ax, label=colour_label, fraction=0.04)
    ax.set_title(_wrap(title))
    return fig


def _grid(n: int, cols: int) -> tuple[int, int]:
    return math.ceil(n / cols), min(n, cols)


def curves(
    panels: dict[str, list[dict]], param: str, threshold: float | None, title: str,
    task_label: str,
) -> Figure:  # fmt: skip
    """Watermark score (upper panel) and task score (lower) against an attack parameter, one
    pair of panels per arch; each line a dict with `label`, `x`, and `wm`, `wm_low`,
    `wm_high`, `task`, `task_low`, `task_high` arrays (NaN bounds: no band, e.g. one seed).
    A line keeps its colour in every panel."""
    names = sorted({line["label"] for lines in panels.values() for line in lines})
    colour = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    rows, cols = _grid(len(panels), 4)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(3.3 * cols + 0.4, 4.6 * rows + 0.6),
                             squeeze=False)  # fmt: skip
    for ax in axes.flat:
        ax.set_visible(False)
    for i, (panel, lines) in enumerate(panels.items()):
        r, c = divmod(i, cols)
        top, bottom = axes[2 * r, c], axes[2 * r + 1, c]
        for ax, key in ((top, "wm"), (bottom, "task")):
            ax.set_visible(True)
            for line in lines:
                x = np.asarray(line["x"], dtype=float)
                ax.plot(x, line[key], marker="o", ms=3, color=colour[line["label"]],
                        label=line["label"])  # fmt: skip
                low, high = np.asarray(line[f"{key}_low"]), np.asarray(line[f"{key}_high"])
                ok = np.isfinite(low) & np.isfinite(high)
                if ok.any():
                    ax.fill_between(x[ok], low[ok], high[ok], color=colour[line["label"]],
                                    alpha=0.18, lw=0)  # fmt: skip
        if threshold is not None and math.isfinite(threshold):
            top.axhline(threshold, color="crimson", ls="--", lw=1)
        top.set_title(panel, fontsize=9)
        top.set_ylabel("watermark score" if c == 0 else "")
        bottom.set_ylabel(task_label if c == 0 else "")
        bottom.set_xlabel(param)
    handles = [plt.Line2D([], [], color=colour[n], marker="o", ms=3) for n in names]
    labels = list(names)
    if threshold is not None and math.isfinite(threshold):
        handles.append(plt.Line2D([], [], color="crimson", ls="--"))
        labels.append("detection threshold (mean)")
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7,
               frameon=False, bbox_to_anchor=(0.5, -0.02))  # fmt: skip
    fig.suptitle(_wrap(title, 110))
    fig.tight_layout(rect=(0, 0.04 + 0.02 * math.ceil(len(labels) / 4), 1, 1))
    return fig


def pareto(panels: dict[str, pd.DataFrame], budget: float, budget_label: str,
           title: str) -> Figure:  # fmt: skip
    """WRT's view, one panel per arch: task-score loss (x) against the watermark score after
    the attack (y), one point per attack setting (the same colour in every panel); removals
    (WRT's rule, in at least half of the cells) drawn as crosses. Each panel's frame has
    columns label, task_drop, wm_score, removed (share), threshold."""
    names = sorted({n for points in panels.values() for n in points["label"]})
    colour = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(names)}
    rows, cols = _grid(len(panels), 3)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 2.6, 3.1 * rows + 0.5),
                             squeeze=False)  # fmt: skip
    for ax in axes.flat:
        ax.set_visible(False)
    for i, (panel, points) in enumerate(panels.items()):
        ax = axes.flat[i]
        ax.set_visible(True)
        removed = pd.to_numeric(points["removed"], errors="coerce").fillna(0).to_numpy() >= 0.5
        colours = np.array([colour[n] for n in points["label"]]).reshape(-1, 4)
        x, y = points["task_drop"].to_numpy(), points["wm_score"].to_numpy()
        for mask, marker, size in ((~removed, "o", 22), (removed, "X", 55)):  # one call each
            if mask.any():
                ax.scatter(x[mask], y[mask], c=colours[mask], marker=marker, s=size)
        ax.axvline(budget, color="grey", ls=":", lw=1)
        threshold = pd.to_numeric(points["threshold"], errors="coerce").mean()
        if math.isfinite(threshold):
            ax.axhline(threshold, color="crimson", ls="--", lw=1)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("task-score loss (marked - attacked)")
        ax.set_ylabel("watermark score after attack" if i % cols == 0 else "")
    handles = [plt.Line2D([], [], color=colour[n], marker="o", ls="") for n in names]
    handles += [plt.Line2D([], [], color="k", marker="X", ls=""),
                plt.Line2D([], [], color="grey", ls=":"),
                plt.Line2D([], [], color="crimson", ls="--")]  # fmt: skip
    labels = [*names, "removed (WRT's rule)", budget_label, "detection threshold"]
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=6.5,
               frameon=False)  # fmt: skip
    fig.suptitle(_wrap(title, 110))
    fig.tight_layout()
    return fig


def bars(table: pd.DataFrame, x: list[str], y: list[str], ylabel: str, title: str,
         hline: float | None = None) -> Figure:  # fmt: skip
    """Grouped bars: one group per row of `table` (labelled by its `x` columns joined), one
    bar per `y` column; drawn horizontally when there are more than 12 groups."""
    labels = [" · ".join(str(v) for v in row) for row in table[x].itertuples(index=False)]
    n, k = len(table), len(y)
    horizontal = n > 12
    if horizontal:
        fig, ax = plt.subplots(figsize=(8.0, min(40.0, 0.16 * n * k + 1.6)))
    else:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * n * k + 2.0), 3.6))
    width = 0.8 / k
    colours = plt.get_cmap("tab10")
    for j, col in enumerate(y):
        values = pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=float)
        where = np.arange(n) + (j - (k - 1) / 2) * width
        draw = ax.barh if horizontal else ax.bar
        draw(where, values, width, label=col, color=colours(j))
    if hline is not None:
        (ax.axvline if horizontal else ax.axhline)(hline, color="grey", lw=0.8)
    if horizontal:
        ax.set_yticks(range(n), [_wrap(s, 60) for s in labels], fontsize=7)
        ax.invert_yaxis()  # the table's order, top to bottom
        ax.set_xlabel(ylabel)
    else:
        ax.set_xticks(range(n), [_wrap(s, 24) for s in labels], rotation=35, ha="right",
                      fontsize=7)  # fmt: skip
        ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(_wrap(title))
    return fig


def optuna_figures(study) -> dict[str, Figure]:
    """Optuna's own matplotlib views of a study: optimisation history and (with 2+ finished
    trials and a varying parameter) parameter importances."""
    import optuna  # lazy: only for a tuned scenario
    from optuna.visualization import matplotlib as ovm  # lazy

    out: dict[str, Figure] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna flags its matplotlib views as experimental
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        out["optuna_history"] = ovm.plot_optimization_history(study).figure
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        if len(complete) >= 2 and any(len({str(t.params.get(k)) for t in complete}) > 1
                                      for k in complete[0].params):  # fmt: skip
            try:
                out["optuna_importances"] = ovm.plot_param_importances(study).figure
            except (RuntimeError, ValueError):
                pass  # importances need variation Optuna can fit; the history stays
    return out
