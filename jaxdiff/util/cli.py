"""What every jaxdiff command shares: the multi-process and compilation-cache flags, a quiet console
(orbax logs every save and restore at INFO), and one clear line instead of a traceback for bad input."""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def report_errors(fn: Callable[[], object], prog: str, errors: tuple = ERRORS, status: int = 2) -> int:
    """Run fn() and return its exit status (fn's int result, else 0); an error of `errors` becomes one
    line `prog: error: ...` on stderr and exit `status`."""
    try:
        result = fn()
        return result if isinstance(result, int) and not isinstance(result, bool) else 0
    except errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return status


def main_of(main: Callable[[Optional[Sequence[str]]], Optional[int]], prog: str) -> None:
    """`if __name__ == "__main__": cli.main_of(main, "python -m jaxdiff.x")` for argparse commands."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    sys.exit(report_errors(lambda: main(None), prog))
