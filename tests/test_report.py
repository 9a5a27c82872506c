"""The sweep's plots stay readable: far-off settings get their own panel, point labels never collide."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from jaxdiff.eval import report  # noqa: E402


def _rows(cfg_zero_fid, cfg_zero_is=1.2):
    rows = [dict(guidance="none", scale=0.0, sampler="ddim", steps=50, fid=30.0, inception_score=2.1)]
    for s, fid, is_ in [(0.0, cfg_zero_fid, cfg_zero_is), (1.5, 25.0, 2.4), (2.0, 24.0, 2.45), (3.0, 26.0, 2.5),
                        (5.0, 31.0, 2.52), (8.0, 40.0, 2.5)]:
        rows.append(dict(guidance="cfg", scale=s, sampler="ddim", steps=50, fid=fid, inception_score=is_))
    return rows


def test_far_off_finds_the_setting_that_squeezes_the_others():
    rows = _rows(180.0)
    far = report.far_off([r["inception_score"] for r in rows], [r["fid"] for r in rows])
    assert [r["scale"] for r, f in zip(rows, far) if f and r["guidance"] == "cfg"] == [0.0]
    assert sum(far) == 1
    assert not any(report.far_off([1.0, 1.1, 1.2, 1.3], [5.0, 5.5, 6.0, 6.5]))


def test_fid_vs_is_gets_a_second_panel_only_when_a_setting_is_far_off(tmp_path):
    wide = report.write_plots(_rows(180.0), str(tmp_path / "far"))[0]
    narrow = report.write_plots(_rows(33.0, 2.3), str(tmp_path / "near"))[0]
    assert wide.endswith("fid_vs_is.png") and narrow.endswith("fid_vs_is.png")
    assert Image.open(wide).size[0] == 2 * Image.open(narrow).size[0]


def test_labels_of_crowded_points_do_not_overlap():
    fig, ax = plt.subplots(figsize=(4, 3))
    rng = np.random.default_rng(0)
    pts = [(2.4 + 0.01 * rng.standard_normal(), 25 + 0.3 * rng.standard_normal()) for _ in range(8)] + [(1.0, 100.0)]
    ax.plot(*zip(*pts), "o")
    anns = report.place_labels(ax, pts, [f"{s:.1f}" for s in np.linspace(0, 10, len(pts))])
    boxes = [a.get_window_extent(fig.canvas.get_renderer()) for a in anns]
    overlaps = [(i, j) for i in range(len(boxes)) for j in range(i) if report._overlap(boxes[i], boxes[j])]
    plt.close(fig)
    assert not overlaps, overlaps
