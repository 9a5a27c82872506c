"""python -m jaxdiff.sample merge OUT: OUT/shards -> OUT/samples.npz and OUT/grid.png."""

from __future__ import annotations

from typing import Optional, Sequence

from jaxdiff.sample.shards import merge
from jaxdiff.util import cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m jaxdiff.sample",
                                description="Merge the shards of a sample.py run (sample.py merges by itself; "
                                            "this is for shards collected from per-host disks).")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="OUT/shards -> OUT/samples.npz (sample-id order) + OUT/grid.png")
    m.add_argument("out", help="the config.out of the sample.py run")
    m.add_argument("--grid_max", type=int, default=64, help="images in the grid (0 = no grid)")
    args = p.parse_args(argv)
    res = merge(args.out, grid_max=args.grid_max)
    print(f"wrote {res['npz']} ({res['num_samples']} images)" + (f" and {res['grid']}" if res["grid"] else ""))
    return 0


if __name__ == "__main__":
    cli.main_of(main, "python -m jaxdiff.sample")
