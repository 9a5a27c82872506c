"""What every jaxdiff command shares: the multi-process and compilation-cache flags, a quiet console
(orbax logs every save and restore at INFO), and one clear line instead of a traceback for bad input."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional, Sequence

ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def define_flags() -> None:
    """absl flags for multi-process runs and the persistent compilation cache (once per program)."""
    from absl import flags

    if "num_processes" in flags.FLAGS:
        return
    flags.DEFINE_string("coordinator_address", None, "multi-process: HOST:PORT of process 0")
    flags.DEFINE_integer("num_processes", 1, "multi-process: number of processes")
    flags.DEFINE_integer("process_id", 0, "multi-process: index of this process")
    flags.DEFINE_enum("distributed", "auto", ["auto", "off"],
                      "multi-process without the flags above: 'auto' joins the cluster JAX detects (TPU pod "
                      "slices, SLURM, Open MPI, Kubernetes) with jax.distributed.initialize(), and runs as "
                      "one process where none is found; 'off' never does")
    flags.DEFINE_string("jax_cache_dir", "~/.cache/jaxdiff/xla",
                        "persistent XLA compilation cache (a rerun skips compiling); '' = off. "
                        "$JAX_COMPILATION_CACHE_DIR wins when set")


def setup() -> None:
    """Apply the flags of `define_flags` (call first in main, before any other JAX work)."""
    import jax
    from absl import flags
    from absl import logging as absl_logging

    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("jaxdiff").setLevel(logging.INFO)
    if FLAGS.jax_cache_dir and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.jax_cache_dir))
        if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from jaxdiff import parallel

    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                        auto_detect=FLAGS.distributed == "auto")


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
