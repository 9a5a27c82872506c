"""Tables and plots of a guidance sweep: the fidelity/diversity curve as numbers and pictures."""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

from jaxdiff.diffusion import guidance
from jaxdiff.util import files

COLUMNS = (
    ("guidance", "guidance"), ("scale", "scale"), ("sampler", "sampler"), ("steps", "steps"),
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


def write_plots(rows: Sequence[Mapping], out_dir: str) -> list[str]:
    """FID against IS, precision against recall, accuracy against scale (PNG files); for a text sweep
    also attribute accuracy and the evaluation CLIP's score against scale, FID against that score."""
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
        specs += [("scale", "attribute_accuracy", scale, "attribute accuracy (named attributes; chance 1/3)",
                   "attribute_accuracy_vs_scale.png"),
                  ("scale", "clip_score", scale, "evaluation-CLIP score (cosine x 100)", "clip_score_vs_scale.png"),
                  ("clip_score", "fid", "evaluation-CLIP score", "FID", "fid_vs_clip_score.png")]
    paths = []
    for xk, yk, xl, yl, fname in specs:
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        for (gname, sampler, steps), rs in _series(rows):
            rs = [r for r in rs if xk in r and yk in r]
            if not rs:
                continue
            xs, ys = [r[xk] for r in rs], [r[yk] for r in rs]
            ax.plot(xs, ys, marker="o", label=f"{gname} ({sampler} {steps})")
            if xk != "scale":
                for r, x, y in zip(rs, xs, ys):
                    ax.annotate(_fmt(r["scale"]), (x, y),
                                fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(files.atomic_write(os.path.join(out_dir, fname),
                                        lambda f, fig=fig: fig.savefig(f, format="png", dpi=110)))
        plt.close(fig)
    return paths
