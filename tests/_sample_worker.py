"""sample.py with test hooks, run by tests/test_sample_shards.py in subprocesses.

Always: `parallel.gather_rows` raises (sample.py's path must never gather images to every process).
  JAXDIFF_TEST_KILL_AFTER_SHARDS=k   SIGKILL this process right after it has written its k-th shard
"""

import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxdiff import parallel
from jaxdiff.sample import shards  # noqa: E402


def _no_gather(*args, **kwargs):
    raise AssertionError("sample.py gathered images to every process")


parallel.gather_rows = _no_gather

_kill_after = int(os.environ.get("JAXDIFF_TEST_KILL_AFTER_SHARDS", "0"))
if _kill_after:
    _write_shard, _written = shards.write_shard, []

    def write_shard(*args, **kwargs):
        path = _write_shard(*args, **kwargs)
        _written.append(path)
        if len(_written) >= _kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    shards.write_shard = write_shard

sys.argv[0] = str(REPO / "sample.py")
runpy.run_path(str(REPO / "sample.py"), run_name="__main__")
