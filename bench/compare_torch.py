"""jaxdiff against openai/guided-diffusion's PyTorch code, alternated in one process; prints JSON.

    pip install torch==2.13.0                                      # CPU wheel; not a jaxdiff requirement
    git clone https://github.com/openai/guided-diffusion /path/to/guided-diffusion
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python bench/compare_torch.py --guided-diffusion /path/to/guided-diffusion \
        [--batches 16,64] [--repeats 15] [--warmup 2] [--threads 2] [--check] [--markdown]

`--guided-diffusion` is a checkout of openai/guided-diffusion (the folder holding
`guided_diffusion/`); without it the installed `guided_diffusion` package is used.

Gate (always first, `--check` runs only it): guided-diffusion's UNetModel and EncoderUNetModel,
built with fixture A's flags (tests/fixtures/adm_tiny_a_flags.json) and loaded with fixture A's
state_dicts (strict), must reproduce tests/fixtures/adm_tiny_a.npz: the U-Net output, the logits,
the guidance gradient, and the 10-step classifier-guided DDIM loops of respacings "ddim10" and "10"
(with the respaced betas), to relative error < 1e-4; the "10" loop, which includes the
ill-conditioned t = 999, < 1e-3. Nothing is timed if it fails (exit status 1).

Timed, per batch, each as jaxdiff and as guided-diffusion, called in turn (jaxdiff, PyTorch,
jaxdiff, ...) so both meet the same machine state (this VM's speed drifts +-30 % within minutes):
  unet_forward                 one U-Net forward (PyTorch under no_grad)
  guidance_gradient            s * grad_x sum_i log p(y_i | x_t, t) (the cond_fn of guided-diffusion's
                               scripts/classifier_sample.py)
  classifier_guided_ddim_step  one DDIM step (eta 0) with classifier guidance, respacing "10", step 5
                               (SpacedDiffusion.ddim_sample with cond_fn)
  train_step                   one U-Net training step: hybrid loss (MSE on eps + vb, learned sigma) at
                               uniform t, backward, AdamW (lr 1e-4), EMA 0.9999 (training_losses, AdamW,
                               nn.update_ema; TrainLoop's logging left out)
jaxdiff's side is bench/bench_sampling.py's and bench/bench_training.py's compiled functions
(`jaxdiff.util.cpu.jit`); the sampling quantities use fixture A's weights on both sides, the training
steps random ones. Reported: both medians, jaxdiff / PyTorch, the quartiles of the per-pair ratios,
and jaxdiff / the issue's PyTorch figures. One process means one malloc for both: with the
GLIBC_TUNABLES above both sides get the huge-page malloc (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import bench_sampling
import bench_training
import common  # first: puts this checkout's jaxdiff on sys.path
import numpy as np

# guided-diffusion (PyTorch 2.13, 2 threads) on this project's CPU, fixture-A architecture, median ms,
# as given in the issue
ISSUE_FIGURES = {
    16: {"unet_forward": 265, "guidance_gradient": 230, "classifier_guided_ddim_step": 388, "train_step": 735},
    64: {"unet_forward": 1000, "guidance_gradient": 513, "classifier_guided_ddim_step": 1612, "train_step": 3609},
}
# bench_sampling.build's name of each sampling quantity
SAMPLING = {"unet_forward": "unet_forward", "guidance_gradient": "guidance_gradient",
            "classifier_guided_ddim_step": "step_classifier"}
TOLERANCE, T999_TOLERANCE = 1e-4, 1e-3
HOW_TO_GET = ("guided-diffusion's code is needed: git clone https://github.com/openai/guided-diffusion and pass "
              "--guided-diffusion PATH_TO_THAT_CHECKOUT (or pip install that checkout)")


def import_guided_diffusion(path: str | None):
    """(torch, guided_diffusion) from the checkout at `path`, or installed; SystemExit saying how to get them."""
    if path:
        root = pathlib.Path(path).expanduser().resolve()
        if not (root / "guided_diffusion" / "unet.py").is_file():
            raise SystemExit(f"--guided-diffusion {path!r}: no guided_diffusion/unet.py under it; {HOW_TO_GET}")
        sys.path.insert(0, str(root))
    try:
        import torch
    except ImportError:
        raise SystemExit("PyTorch is needed: pip install torch==2.13.0 (the CPU wheel)") from None
    try:
        import guided_diffusion
        from guided_diffusion import nn, resample, script_util, unet  # noqa: F401  (loads the submodules)
    except ImportError as e:
        raise SystemExit(f"{e}; {HOW_TO_GET}") from None
    return torch, guided_diffusion


class Reference:
    """guided-diffusion's models and diffusions, fixture A's flags, float32 on the CPU."""

    def __init__(self, th, gd, fx: dict, weights: str = "fixture"):
        self.th, self.gd, self.fx = th, gd, fx
        self.unet = gd.unet.UNetModel(**common.UNET_FLAGS)
        self.classifier = gd.unet.EncoderUNetModel(**common.CLASSIFIER_FLAGS)
        if weights == "fixture":
            for model, prefix in ((self.unet, "unet"), (self.classifier, "classifier")):
                sd = {k: th.from_numpy(v) for k, v in common.state_dict(fx, prefix).items()}
                model.load_state_dict(sd, strict=True)
        self.unet.eval(), self.classifier.eval()
        self.scale = float(fx["classifier_scale"])

    def diffusion(self, respacing: str = ""):
        return self.gd.script_util.create_gaussian_diffusion(
            steps=1000, learn_sigma=True, noise_schedule="cosine", timestep_respacing=respacing)

    def cond_fn(self, x, t, y):
        """scale * d/dx sum_i log_softmax(classifier(x, t))[i, y_i]."""
        th = self.th
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = th.log_softmax(self.classifier(x_in, t), dim=-1)
            return th.autograd.grad(log_probs[th.arange(len(y)), y].sum(), x_in)[0] * self.scale

    def gate(self) -> dict:
        """Relative errors against the fixture, the tolerances, and whether all are within them."""
        th, fx = self.th, self.fx
        x, t, y = (th.from_numpy(fx[k]) for k in ("x", "t", "y"))
        with th.no_grad():
            errs = {"unet_out": _rel(self.unet(x, t, y), fx["unet_out"]),
                    "classifier_logits": _rel(self.classifier(x, t), fx["classifier_logits"])}
        errs["cond_grad"] = _rel(self.cond_fn(x, t, y), fx["cond_grad"])
        x_T = th.from_numpy(fx["x_T"])
        for r in ("ddim10", "10"):
            diff = self.diffusion(r)
            errs[f"{r}/betas"] = _rel(diff.betas, fx[f"{r}/betas"])
            out = diff.ddim_sample_loop(self.unet, tuple(x_T.shape), noise=x_T, clip_denoised=True,
                                        model_kwargs={"y": y}, cond_fn=self.cond_fn)
            errs[f"{r}/ddim_guided"] = _rel(out, fx[f"{r}/ddim_guided"])
        tolerances = {k: T999_TOLERANCE if k == "10/ddim_guided" else TOLERANCE for k in errs}
        return {"rel_errors": errs, "tolerances": tolerances,
                "passed": all(v < tolerances[k] for k, v in errs.items())}

    def sampling_fns(self, batch: int) -> dict:
        """{quantity: no-argument call} at `batch`, as bench_sampling.build's inputs (respacing "10", step 5)."""
        th = self.th
        g = th.Generator().manual_seed(0)
        x = th.randn((batch, 3, 32, 32), generator=g)
        y = th.arange(batch) % 10
        diff = self.diffusion("10")
        i = th.full((batch,), diff.num_timesteps // 2, dtype=th.long)
        t = th.tensor(diff.timestep_map)[i]

        def unet_forward():
            with th.no_grad():
                return self.unet(x, t, y)

        def guided_step():
            with th.no_grad():
                return diff.ddim_sample(self.unet, x, i, clip_denoised=True, cond_fn=self.cond_fn,
                                        model_kwargs={"y": y}, eta=0.0)

        return {"unet_forward": unet_forward, "guidance_gradient": lambda: self.cond_fn(x, t, y),
                "classifier_guided_ddim_step": guided_step}

    def train_step(self, batch: int):
        """One guided-diffusion training step of the U-Net on a fixed random batch, per call."""
        th, gd = self.th, self.gd
        g = th.Generator().manual_seed(0)
        images = th.rand((batch, 3, 32, 32), generator=g) * 2 - 1
        y = th.arange(batch) % 10
        diff = self.diffusion()
        sampler = gd.resample.UniformSampler(diff)
        params = list(self.unet.parameters())
        opt = th.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        ema = [p.detach().clone() for p in params]
        self.unet.train()  # dropout 0: the same computation

        def step():
            gd.fp16_util.zero_grad(params)
            t, weights = sampler.sample(batch, "cpu")
            loss = (diff.training_losses(self.unet, images, t, model_kwargs={"y": y})["loss"] * weights).mean()
            loss.backward()
            opt.step()
            gd.nn.update_ema(ema, params, rate=0.9999)

        return step


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def compare_batch(ref: Reference, train_ref: Reference, batch: int, repeats: int, warmup: int) -> dict:
    jax_fns = bench_sampling.build(batch, steps=10, weights="fixture")
    torch_fns = ref.sampling_fns(batch)
    rows = {q: common.duel(common.blocking(jax_fns[name][0], *jax_fns[name][1]), torch_fns[q], repeats, warmup)
            for q, name in SAMPLING.items()}
    built = bench_training.build_step(*bench_training.fixture_a_config("diffusion", batch, "float32"))
    rows["train_step"] = common.duel(built["run"], train_ref.train_step(batch), repeats, warmup)
    for q, row in rows.items():
        issue = ISSUE_FIGURES.get(batch, {}).get(q)
        row["torch_issue_ms"] = issue
        row["ratio_issue"] = round(row["jaxdiff_ms"] / issue, 3) if issue else None
        print(json.dumps({"batch": batch, "quantity": q, **{k: v for k, v in row.items() if not k.endswith("all_ms")}}),
              file=sys.stderr, flush=True)
    return rows


def markdown(table: dict) -> str:
    lines = []
    for b, rows in table.items():
        lines += [f"| batch {b} | jaxdiff | PyTorch, same run | ratio | PyTorch, issue | ratio |", "|---|---|---|---|---|---|"]
        for q, r in rows.items():
            issue = f"{r['torch_issue_ms']} | {r['ratio_issue']:.2f}" if r["torch_issue_ms"] else "- | -"
            lines.append(f"| {q.replace('_', ' ')} | {r['jaxdiff_ms']:.0f} | {r['torch_ms']:.0f} | {r['ratio']:.2f} | "
                         f"{issue} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--guided-diffusion", metavar="PATH", help="checkout of openai/guided-diffusion (else: installed)")
    p.add_argument("--batches", default="16,64")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per side, quantity and batch")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (>= 1: jaxdiff's first call compiles)")
    p.add_argument("--threads", type=int, default=2, help="PyTorch's torch.set_num_threads")
    p.add_argument("--check", action="store_true", help="only the gate against the fixture")
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown (stderr)")
    args = p.parse_args(argv)
    batches = [v.strip() for v in args.batches.split(",") if v.strip()]
    if not batches or not all(v.isdigit() and int(v) > 0 for v in batches):
        p.error(f"--batches must be a comma list of positive integers, got {args.batches!r}")
    if args.repeats < 1 or args.warmup < 1 or args.threads < 1:  # jaxdiff's first call compiles
        p.error(f"need --repeats >= 1, --warmup >= 1, --threads >= 1; got {args.repeats}, {args.warmup}, {args.threads}")
    th, gd = import_guided_diffusion(args.guided_diffusion)
    th.set_num_threads(args.threads)
    th.manual_seed(0)
    np.random.seed(0)  # guided-diffusion's UniformSampler draws from numpy's global generator
    fx = common.load_fixture()
    ref = Reference(th, gd, fx)
    out = {"benchmark": "jaxdiff vs guided-diffusion (PyTorch), alternated in one process",
           "guided_diffusion": str(pathlib.Path(gd.__file__).parent), "torch": th.__version__,
           "torch_threads": th.get_num_threads(), "gate": ref.gate()}
    if args.check or not out["gate"]["passed"]:
        print(json.dumps(out, indent=1))
        return 0 if out["gate"]["passed"] else 1
    out["machine_at_start"] = common.machine()
    # the training steps change their model's weights: they get a model of their own
    train_ref = Reference(th, gd, fx, weights="random")
    out["table"] = {int(b): compare_batch(ref, train_ref, int(b), args.repeats, args.warmup) for b in batches}
    out["machine_at_end"] = common.machine()
    print(json.dumps(out, indent=1))
    if args.markdown:
        print(markdown(out["table"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
