"""python -m jaxdiff.data prepare digits fashion_mnist [--data_dir D]: prepare the bundled datasets."""

from __future__ import annotations

from jaxdiff.data.sources import BUNDLED_DATASETS, prepare


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jaxdiff.data")
    sub = parser.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="prepare bundled datasets (array_record)")
    prep.add_argument("names", nargs="+", choices=BUNDLED_DATASETS)
    prep.add_argument("--data_dir", default=None)
    prep.add_argument("--manual_dir", default=None, help="fashion_mnist(_text) idx directory")
    args = parser.parse_args(argv)
    for name in args.names:
        builder = prepare(name, args.data_dir, manual_dir=args.manual_dir)
        splits = {k: v.num_examples for k, v in builder.info.splits.items()}
        print(f"{name}: {builder.data_dir} {splits}")


if __name__ == "__main__":
    from jaxdiff.util import cli

    cli.main_of(main, "python -m jaxdiff.data")
