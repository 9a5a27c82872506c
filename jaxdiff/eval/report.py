"""Tables and plots of a guidance sweep: the fidelity/diversity curve as numbers and pictures."""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

from jaxdiff.diffusion import guidance
from jaxdiff.util import files

COLUMNS = (
    ("guidance", "guidance"), ("scale", "scale"), ("prior_scale", "prior scale"), ("sampler", "sampler"), ("steps", "steps"),
    ("fid", "FID"), ("sfid", "sFID"), ("inception_score", "IS"), ("precision", "precision"), ("recall", "recall"),
    ("density", "density"), ("coverage", "coverage"), ("accuracy", "accuracy"),
    ("attribute_accuracy", "attribute acc"), ("clip_score", "eval-CLIP score"),
    ("num_samples", "N"), ("seconds", "sample s"),
)
ATTRIBUTE_PREFIX = "attribute_accuracy/"  # per-attribute accuracies of a text sweep: a column each


def _columns(rows: Sequence[Mapping]) -> list:
    """COLUMNS present in the rows, with one column per attribute after the attribute accuracy."""
    cols = []
    attrs = list(dict.fromkeys(k for r in rows for k in r if k.startswith(ATTRIBUTE_PREFIX)))
    for k, h in COLUMNS:
        if any(k in r for r in rows):
            cols.append((k, h))
        if k == "attribute_accuracy":
            cols += [(a, a[len(ATTRIBUTE_PREFIX):]) for a in attrs]
    return cols


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping]) -> str:
    """A markdown table with one line per sweep setting (columns missing from a row are blank)."""
    cols = _columns(rows)
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[k]) if k in r else "" for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[Mapping], out_dir: str, name: str = "results") -> tuple[str, str]:
    """Write `name`.md and `name`.json under out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    md, js = os.path.join(out_dir, f"{name}.md"), os.path.join(out_dir, f"{name}.json")
    files.atomic_write(md, markdown_table(rows))
    files.write_json(js, list(rows))
    return md, js


def _series(rows: Sequence[Mapping]):
    """Rows grouped by (guidance, sampler, steps), sorted by scale.

    The unguided row ("none") of the same sampler joins each curve at the guide's neutral scale
    (0 for gradient guides, 1 for CFG), so every curve starts from plain conditional sampling.
    """
    none = [r for r in rows if r["guidance"] == "none"]
    groups: dict[tuple, list] = {}
    for r in rows:
        if r["guidance"] != "none":
            groups.setdefault((r["guidance"], r.get("sampler"), r.get("steps")), []).append(r)
    for key, rs in groups.items():
        neutral = guidance.GUIDES[key[0]].neutral if key[0] in guidance.GUIDES else 0.0
        base = [dict(r, scale=neutral) for r in none if (r.get("sampler"), r.get("steps")) == key[1:]]
        yield key, sorted(base + rs, key=lambda r: r["scale"])
    if not groups:
        for r in none:
            yield ("none", r.get("sampler"), r.get("steps")), [r]


FAR_GAP = 2.0  # a minority of settings this many times the others' span away (on x or y) is far off


def far_off(xs: Sequence[float], ys: Sequence[float]) -> list[bool]:
    """Which points lie far from the others: on either axis, the largest gap between sorted values
    splits off a minority of points when it exceeds FAR_GAP times the span of the majority (CFG at
    s = 0, say, whose FID would squeeze every other point into one corner of a shared plot)."""
    import numpy as np

    out = np.zeros(len(xs), bool)
    for vs in (xs, ys):
        v = np.asarray(vs, np.float64)
        if len(v) < 3:
            continue
        order = np.argsort(v)
        gaps = np.diff(v[order])
        i = int(np.argmax(gaps))
        low, high = order[:i + 1], order[i + 1:]
        minority, majority = (low, high) if len(low) < len(high) else (high, low)
        if len(minority) < len(majority) and gaps[i] > FAR_GAP * np.ptp(v[majority]):
            out[minority] = True
    return out.tolist()


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


# Label offsets in points, nearest first: right, above, left, below, the diagonals, then further out.
_OFFSETS = [(dx * r, dy * r) for r in (4, 10, 18, 28)
            for dx, dy in ((1, 0.2), (0, 1), (-1, 0.2), (0, -1.4), (1, 1), (-1, 1), (1, -1), (-1, -1))]


def place_labels(ax, points: Sequence[tuple], texts: Sequence[str], fontsize: int = 7) -> list:
    """Annotate each point (data coordinates) with its text at the first offset of `_OFFSETS` whose label
    overlaps no label placed before it and no marker; returns the annotations (the last offset when
    every one collides)."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    px_per_pt = fig.dpi / 72.0
    marks = []
    for x, y in points:
        cx, cy = to_px((x, y))
        r = 3.5 * px_per_pt
        marks.append(Bbox.from_extents(cx - r, cy - r, cx + r, cy + r))
    placed, anns = [], []
    for (x, y), text in zip(points, texts):
        ann = None
        for dx, dy in _OFFSETS:
            if ann is not None:
                ann.remove()
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            ann = ax.annotate(text, (x, y), fontsize=fontsize, textcoords="offset points", xytext=(dx, dy),
                              ha=ha, va="center")
            box = ann.get_window_extent(renderer)
            if not any(_overlap(box, b) for b in placed + marks):
                break
        placed.append(ann.get_window_extent(renderer))
        anns.append(ann)
    return anns


def _draw(ax, series: list, xk: str, yk: str, keep=None) -> None:
    """The curves of `series` ([(name, rows)]) on ax, the scales labelled (not on scale axes); `keep(row)`
    selects the rows drawn."""
    labelled = []
    for name, rs in series:
        rs = [r for r in rs if keep is None or keep(r)]
        if not rs:
            continue
        xs, ys = [r[xk] for r in rs], [r[yk] for r in rs]
        ax.plot(xs, ys, marker="o", label=name)
        if xk != "scale":
            labelled += [((x, y), _fmt(r["scale"])) for r, x, y in zip(rs, xs, ys)]
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    if labelled:
        place_labels(ax, [p for p, _ in labelled], [t for _, t in labelled])


def write_plots(rows: Sequence[Mapping], out_dir: str) -> list[str]:
    """FID against IS, precision against recall, accuracy against scale (PNG files); for a text sweep
    also attribute accuracy and the evaluation CLIP's score against scale, FID and recall against that score
    (the fidelity / diversity trade-off of each guidance family: unCLIP's against GLIDE's CFG, say).

    Point labels (the scales) go where they collide with no other label or marker. When some settings
    are far off the others (`far_off`), a second panel shows the rest at their own scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    specs = [("inception_score", "fid", "IS", "FID", "fid_vs_is.png"),
             ("recall", "precision", "recall", "precision", "precision_vs_recall.png"),
             ("scale", "accuracy", "guidance scale (none = 0 for classifier, 1 for CFG)", "classifier accuracy",
              "accuracy_vs_scale.png")]
    if any("clip_score" in r for r in rows):
        scale = "guidance scale (none = 1 for CFG, 0 for CLIP)"
        if any(r.get("sampler") == "unclip" for r in rows):
            scale = "guidance scale (none = 1 for CFG; unCLIP: the decoder's)"
        specs += [("scale", "attribute_accuracy", scale, "attribute accuracy (named attributes; chance 1/3)",
                   "attribute_accuracy_vs_scale.png"),
                  ("scale", "clip_score", scale, "evaluation-CLIP score (cosine x 100)", "clip_score_vs_scale.png"),
                  ("clip_score", "fid", "evaluation-CLIP score", "FID", "fid_vs_clip_score.png"),
                  ("clip_score", "recall", "evaluation-CLIP score", "recall (diversity)", "recall_vs_clip_score.png")]
    paths = []
    for xk, yk, xl, yl, fname in specs:
        series = [(f"{g} ({sampler} {steps})", [r for r in rs if xk in r and yk in r])
                  for (g, sampler, steps), rs in _series(rows)]
        points = [r for _, rs in series for r in rs]
        far = far_off([r[xk] for r in points], [r[yk] for r in points]) if xk != "scale" and len(points) > 3 else []
        far_ids = {id(r) for r, f in zip(points, far) if f}
        panels = 2 if far_ids and len(far_ids) < len(points) - 1 else 1
        fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
        for i, ax in enumerate(axes[0]):
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            if i == 1:
                ax.set_title("without the far-off settings", fontsize=9)
            fig.tight_layout()
            _draw(ax, series, xk, yk, keep=(lambda r, far_ids=far_ids: id(r) not in far_ids) if i == 1 else None)
        paths.append(files.atomic_write(os.path.join(out_dir, fname),
                                        lambda f, fig=fig: fig.savefig(f, format="png", dpi=110)))
        plt.close(fig)
    return paths
