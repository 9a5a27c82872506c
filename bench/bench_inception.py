"""jaxdiff's FID Inception-v3 against torch-fidelity's PyTorch network, interleaved in one process; prints JSON.

    pip install torch==2.13.0 torch-fidelity==0.4.0   # for this script only; not jaxdiff dependencies
    python bench/bench_inception.py [--images 256] [--size 64] [--batch 64] [--rounds 3] [--threads 2]

Both sides compute Inception features of the same `--images` random uint8 images of `--size` x
`--size`, upsampled to 299 in tf1 mode (TensorFlow 1's resize, as guided-diffusion's evaluator):
jaxdiff's `inception.feature_fn(params, "tf1")` (pool3, logits_unbiased, logits, spatial) and
torch-fidelity 0.4.0's `FeatureExtractorInceptionV3` (2048, logits_unbiased, logits), under
torch.inference_mode on `--threads` threads, both in batches of `--batch`. Both get the same seeded
random weights (`random_state_dict`, for the keys and shapes listed in tests/fixtures/inception_a.npz;
the real weights are not needed for timing): torch-fidelity's network loads them from a temporary
.pth, so it downloads nothing. Their outputs on the first batch are checked to agree (max |diff| <= 1e-4 max |ref| for each
array) before anything is timed; the script stops with exit code 1 if not.
After one untimed pass each (jaxdiff compiles), `--rounds` rounds alternate a full pass of jaxdiff
and one of PyTorch. Reported: ms per image for each side (median over rounds), their ratio
(jaxdiff / PyTorch), and each round's ratio.

XLA uses every core of the machine; PyTorch uses `--threads`. On a machine with more cores than
`--threads`, pin the process (taskset -c 0-1 python bench/bench_inception.py) for equal terms.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import types

INSTALL = "pip install torch==2.13.0 torch-fidelity==0.4.0"


def _missing() -> list:
    return [m for m in ("torch", "torch_fidelity") if importlib.util.find_spec(m) is None]


def load_torch_fidelity_inception():
    """torch-fidelity's FeatureExtractorInceptionV3 class, and a note when it had to be imported alone.

    torch_fidelity's package __init__ imports torchvision (for its other extractors); a torchvision
    built for another torch (e.g. a CUDA wheel next to a +cpu torch) fails there. The Inception module
    itself needs only torch, so it is then imported without the package's __init__."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        return FeatureExtractorInceptionV3, None
    except (ImportError, RuntimeError) as e:
        note = f"import torch_fidelity failed ({type(e).__name__}: {str(e)[:200]}); its Inception module was imported alone"
    for name in [m for m in sys.modules if m == "torch_fidelity" or m.startswith("torch_fidelity.")]:
        del sys.modules[name]
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(importlib.util.find_spec("torch_fidelity").submodule_search_locations)
    sys.modules["torch_fidelity"] = pkg
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    return FeatureExtractorInceptionV3, note


def random_state_dict(keys, shapes, seed: int) -> dict:
    """{key: np.ndarray} in PyTorch layout; `shapes` as comma-separated strings ("" for a scalar).
    Weights He-scaled by fan-in, BatchNorm parameters and statistics near the identity."""
    import numpy as np

    rng = np.random.default_rng(int(seed))
    sd = {}
    for key, text in zip(map(str, keys), shapes):
        shape = tuple(int(v) for v in str(text).split(",") if v)
        if key.endswith("num_batches_tracked"):
            sd[key] = np.zeros(shape, np.int64)
        elif len(shape) > 1:
            sd[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)
        else:
            near = 1.0 if key.endswith(("weight", "running_var")) else 0.0
            sd[key] = (near + rng.uniform(-0.1, 0.1, shape)).astype(np.float32)
    return sd


def _batches(images, batch: int) -> list:
    """Equal batches (the last one padded with zeros, so jaxdiff compiles once) and their true sizes."""
    import numpy as np

    out = []
    for i in range(0, len(images), batch):
        b = images[i:i + batch]
        n = len(b)
        if n < batch:
            b = np.concatenate([b, np.zeros((batch - n,) + b.shape[1:], b.dtype)])
        out.append((b, n))
    return out


def _rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=64, help="image height and width before the resize to 299")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="PyTorch's torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0, help="weights and images")
    args = p.parse_args(argv)
    if min(args.images, args.size, args.batch, args.rounds, args.threads) < 1:
        p.error("--images, --size, --batch, --rounds and --threads must be positive")
    missing = _missing()
    if missing:
        print(f"error: this benchmark needs {' and '.join(missing)} (not jaxdiff dependencies): {INSTALL}",
              file=sys.stderr)
        return 2

    import jax
    import numpy as np
    import torch
    from common import ROOT, machine  # first: puts this checkout's jaxdiff on sys.path

    from jaxdiff.convert import inception as convert_inception
    from jaxdiff.eval import inception

    FeatureExtractorInceptionV3, import_note = load_torch_fidelity_inception()
    torch.set_num_threads(args.threads)
    with np.load(ROOT / "tests" / "fixtures" / "inception_a.npz") as f:
        sd = random_state_dict(f["keys"], f["shapes"], args.seed)
    params = convert_inception.params_from_state_dict(sd)
    with tempfile.TemporaryDirectory() as tmp:
        pth = os.path.join(tmp, "inception_seeded.pth")
        torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, pth)
        tnet = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased", "logits"],
                                           feature_extractor_weights_path=pth)
    tnet.eval()

    batch = min(args.batch, args.images)
    images = np.random.default_rng(args.seed).integers(0, 256, (args.images, args.size, args.size, 3), np.uint8)
    batches = _batches(images, batch)
    torch_batches = [torch.from_numpy(b[:n]).permute(0, 3, 1, 2).contiguous() for b, n in batches]
    fn = inception.feature_fn(params, "tf1")

    def run_jaxdiff():
        outs = [fn(params, b) for b, _ in batches]
        jax.block_until_ready(outs)
        return outs

    def run_torch():
        with torch.inference_mode():
            return [tnet(b) for b in torch_batches]

    def timed(run):
        t0 = time.perf_counter()
        out = run()
        return (time.perf_counter() - t0) * 1e3 / args.images, out

    start = machine()
    jout, tout = run_jaxdiff(), run_torch()  # untimed: compiles, warms caches
    n0 = batches[0][1]
    check = {name: _rel(jax.device_get(jout[0][key])[:n0], tout[0][i].numpy())
             for i, (name, key) in enumerate((("pool3", "pool3"), ("logits_unbiased", "logits_unbiased"),
                                                ("logits", "logits")))}
    check["passed"] = all(v <= 1e-4 for v in check.values())
    result = {"benchmark": "FID Inception-v3 features, jaxdiff vs torch-fidelity (tf1 mode)",
              "images": args.images, "image_size": args.size, "batch": batch, "rounds": args.rounds,
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "jax": jax.__version__,
              "check_max_rel_diff": check, "machine_at_start": start}
    if import_note:
        result["torch_fidelity_import"] = import_note
    if not check["passed"]:
        print(json.dumps(result, indent=1))
        return 1
    times = {"jaxdiff": [], "torch": []}
    for _ in range(args.rounds):
        for name, run in (("jaxdiff", run_jaxdiff), ("torch", run_torch)):
            times[name].append(timed(run)[0])
    mj, mt = statistics.median(times["jaxdiff"]), statistics.median(times["torch"])
    result.update(jaxdiff_ms_per_image=round(mj, 2), torch_ms_per_image=round(mt, 2), ratio=round(mj / mt, 3),
                  round_ratios=[round(j / t, 3) for j, t in zip(times["jaxdiff"], times["torch"])],
                  jaxdiff_ms_per_image_rounds=[round(v, 2) for v in times["jaxdiff"]],
                  torch_ms_per_image_rounds=[round(v, 2) for v in times["torch"]],
                  load_average_at_end=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
