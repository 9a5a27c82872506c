"""bench/bench_conv.py --fixture-a: the convolutions found by tracing the U-Net, and the totals it reports."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import bench_conv  # noqa: E402


def test_fixture_a_convs_match_guided_diffusion():
    counts = bench_conv.fixture_a_convs(2)
    # guided-diffusion's UNetModel with the fixture-A flags has 54 nn.Conv2d modules
    assert sum(counts.values()) == 54
    assert all(key[0] == 2 for key in counts)
    assert counts[(2, 32, 3, 32, 3, 1, 1)] == 1  # input conv
    assert counts[(2, 32, 32, 6, 3, 1, 1)] == 1  # output conv: eps and the variance interpolation
    assert counts[(2, 32, 64, 32, 1, 1, 0)] == 2  # 1x1 skip connections of the 32x32 decoder blocks
    assert counts[(2, 8, 64, 64, 3, 1, 1)] == 13


def test_fixture_a_totals_weight_by_count_and_skip_other_shapes():
    def shape(b, h, cin, cout, k, pad):
        return {"B": b, "H": h, "W": h, "Cin": cin, "Cout": cout, "k": k, "stride": 1, "pad": pad}

    results = [
        {"shape": shape(2, 8, 4, 4, 3, 1), "plain/fwd": {"ms": 1.5, "gflops": 9.0}, "torch/fwd": {"ms": 1.0},
         "speedup_fwd_bwd_vs_plain_ynn": 2.0},
        {"shape": shape(2, 4, 4, 8, 1, 0), "plain/fwd": {"ms": 2.0}, "torch/fwd": {"ms": 4.0}},
        {"shape": shape(2, 4, 4, 8, 3, 1), "plain/fwd": {"ms": 100.0}, "torch/fwd": {"ms": 100.0}},
    ]
    counts = {(2, 8, 4, 4, 3, 1, 1): 3, (2, 4, 4, 8, 1, 1, 0): 1}
    assert bench_conv.fixture_a_totals(results, counts) == {
        "2": {"convolutions": 4, "plain/fwd": 6.5, "torch/fwd": 7.0}
    }
