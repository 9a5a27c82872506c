"""Run by tests/test_adm_eval.py in subprocesses: sharded feature extraction and evaluate() on
several (fake CPU) devices or processes. argv: ref.npz samples.npz out_prefix [port num_processes
process_id]. Writes <out_prefix>.npz (features of the samples) and <out_prefix>.json (evaluate)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

if len(sys.argv) > 4:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from jaxdiff import parallel  # noqa: E402

    parallel.initialize(f"localhost:{sys.argv[4]}", int(sys.argv[5]), int(sys.argv[6]))

import _fake_features as F  # noqa: E402
import numpy as np  # noqa: E402

from jaxdiff.eval import adm as adm_eval  # noqa: E402

ref, samples, out = sys.argv[1:4]
params = F.make_params()
result = adm_eval.evaluate(ref, samples, F.feature_fn, params, batch_size=16, progress=False)
rows = {}
with adm_eval.NpzArrayReader(samples) as reader:
    ext = adm_eval.ShardedFeatures(F.feature_fn, params, image_shape=reader.image_shape, batch_size=16)
    ext.run(reader, lambda start, f: rows.update({start: f["pool3"]}), progress=False)
np.savez(out + ".npz", pool3=np.concatenate([rows[s] for s in sorted(rows)]),
         devices=jax.device_count(), processes=jax.process_count())
with open(out + ".json", "w") as f:
    json.dump(result, f)
