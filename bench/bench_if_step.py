"""DeepFloyd IF on the CPU, jaxdiff against diffusers / transformers (PyTorch), alternated in one process.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python bench/bench_if_step.py [--refstack /opt/refstack] \
        [--batch 16] [--captions 64] [--repeats 15] [--warmup 3] [--threads 2] [--wait-idle 85] [--check] \
        [--markdown]

The models are tests/fixtures/if_tiny_a.npz's (/work/shared/fixtures/cascade/README.md): the stage-I U-Net
(`unet1_config`, `unet1/<key>`) and the T5 v1.1 encoder (`t5_config`, `t5/<key>`), built on each side from
the stored config.json and loaded with the same weights: diffusers' `UNet2DConditionModel.from_config` and
transformers' `T5EncoderModel(T5Config(...))` with load_state_dict(strict=True); jaxdiff's
`jaxdiff.convert.diffusers.unet2d_params_from_state_dict` and `jaxdiff.convert.transformers.
t5_params_from_state_dict`. float32 on both sides.

Timed, each as jaxdiff and as PyTorch, called in turn (jaxdiff, PyTorch, jaxdiff, ...) so both meet the same
machine state (this VM's speed drifts +-30 % within minutes):
  cfg_step   one step of IFPipeline's denoising loop at `--batch` images (16x16x3): the U-Net on the 2B rows
             [uncond; cond] with 77-token T5 states (the B captions' and B copies of the empty caption's),
             CFG eps = eps_u + s (eps_c - eps_u), s = 7, the variance channels from the conditional half,
             then DDPMScheduler.step with the fixture's scheduler_config (learned-range variance, dynamic
             thresholding at 0.95 clamped to [1, 1.5]) at t = 500 of IF's 100-step "leading" schedule,
             noise drawn inside the step. PyTorch: IFPipeline's loop body verbatim under torch.no_grad;
             jaxdiff: one `jaxdiff.util.cpu.jit` function, the "diffusers_ddpm" sampler's loop body as the
             cascade builds it (`conditioning.text_unet_fn` through `guides.classifier_free`, `samplers.denoise`
             with dynamic thresholding, `samplers.ddpm_step`). Both take the T5 states as their pipeline holds
             them before the loop: diffusers the [negative; prompt] embeddings, jaxdiff the sampler's
             once-per-call `conditioning.text_prepare` of them (the U-Net's text keys and values, which
             diffusers' U-Net recomputes at every step), computed outside the timed step.
  t5_encode  `--captions` captions of 77 tokens (random ids within the vocabulary, an end token, then
             padding; 5-40 real tokens each): `jaxdiff.models.t5.encode` (host checks + jitted forward)
             vs `T5EncoderModel(input_ids, attention_mask).last_hidden_state` under torch.no_grad.

Gate (always first; `--check` runs only it): PyTorch's models reproduce the fixture (U-Net output, T5 states),
and jaxdiff agrees with PyTorch on the benchmarked inputs: the 2B-row U-Net output, the step's result (with
the same noise) and the T5 states, relative error max|a - b| / max|b| < 1e-4. Nothing is timed if it fails
(exit status 1).

Reported per quantity: both medians (ms), jaxdiff / PyTorch, the quartiles and extremes of the per-round
ratios, every round's times. One process means one malloc for both sides: run once with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 and once without (docs/benchmarks.md).

Load: on a machine shared with other jobs PyTorch's two OpenMP threads lose far more than jaxdiff does (a
step of ~45 ms took 1-7 s per round at load 4-14 while jaxdiff's took 0.07-1.6 s), so alternating does
not make the ratio fair under load. `--wait-idle P` first waits (up to --wait-max seconds) until the CPUs
are at least P % idle over 3 s; the idle share found and the load averages are in the JSON.

The reference stack lives outside the repository (`pip install --target /opt/refstack torch==2.13.0
diffusers==0.42.1 transformers==5.23.0`, or `pip install .[reference]`); `--refstack` is APPENDED to sys.path,
so the environment's numpy / jax stay the ones imported.
"""

from __future__ import annotations

import sys

import common  # first: puts this checkout's jaxdiff on sys.path
import jax
import jax.numpy as jnp
import numpy as np

FIXTURE = common.ROOT / "tests" / "fixtures" / "if_tiny_a.npz"
TOLERANCE = 1e-4
LENGTH = 77            # IF's tokenizer pads / truncates to 77 tokens
GUIDANCE_SCALE = 7.0   # IFPipeline's default
INFERENCE_STEPS = 100  # IFPipeline's default num_inference_steps
TIMESTEP = 500         # the timed step: t = 500 of the 100-step "leading" schedule (990, 980, ..., 0)
NOISE_SEED = 1234


def load_fixture() -> dict:
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def captions(n: int, vocab: int, seed: int = 0, lo: int = 5, hi: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """n token rows of LENGTH: `lo`..`hi` real tokens (random ids in [2, vocab), the last one the end id 1),
    then padding id 0; mask True on the real tokens. Plus, as row n, the empty caption (only the end id)."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((n + 1, LENGTH), np.int64)
    for r, k in enumerate(rng.integers(lo, hi + 1, size=n)):
        tokens[r, :k - 1] = rng.integers(2, vocab, size=k - 1)
        tokens[r, k - 1] = 1
    tokens[n, 0] = 1
    return tokens, tokens > 0


# --- PyTorch: diffusers' U-Net and scheduler, transformers' T5 --------------------------------------------

class Reference:
    def __init__(self, th, diffusers, transformers, fx: dict):
        self.th = th
        self.unet = diffusers.UNet2DConditionModel.from_config(common.config_of(fx, "unet1_config"))
        self.unet.load_state_dict({k: th.from_numpy(v) for k, v in common.state_dict(fx, "unet1").items()}, strict=True)
        self.unet.eval()
        t5_cfg = transformers.T5Config(**common.config_of(fx, "t5_config"))
        self.t5 = transformers.T5EncoderModel(t5_cfg)
        sd = {k: th.from_numpy(v) for k, v in common.state_dict(fx, "t5").items()}
        missing, unexpected = self.t5.load_state_dict(sd, strict=False)
        # a T5EncoderModel ties encoder.embed_tokens to shared: either key alone is the whole state_dict
        if unexpected or any(k not in ("shared.weight", "encoder.embed_tokens.weight") for k in missing):
            raise SystemExit(f"T5 state_dict does not fit: missing {missing}, unexpected {unexpected}")
        self.t5.eval()
        self.scheduler = diffusers.DDPMScheduler.from_config(common.config_of(fx, "scheduler_config"))
        self.scheduler.set_timesteps(INFERENCE_STEPS)
        self.fx = fx

    def gate_fixture(self) -> dict:
        """The reference models against the fixture's own outputs."""
        th, fx = self.th, self.fx
        with th.no_grad():
            t5_out = self.t5(input_ids=th.from_numpy(fx["t5_tokens"]),
                             attention_mask=th.from_numpy(fx["t5_mask"]).long()).last_hidden_state
            u = self.unet(th.from_numpy(fx["unet1_x"]), th.from_numpy(fx["unet1_t"]),
                          encoder_hidden_states=th.from_numpy(fx["t5_out"]), return_dict=False)[0]
        return {"torch_t5_vs_fixture": common.rel(t5_out, fx["t5_out"]), "torch_unet_vs_fixture": common.rel(u, fx["unet1_out"])}

    def encode(self, tokens, mask):
        th = self.th
        ids, am = th.from_numpy(tokens), th.from_numpy(mask.astype(np.int64))

        def run():
            with th.no_grad():
                return self.t5(input_ids=ids, attention_mask=am).last_hidden_state
        return run

    def step_fn(self, x: np.ndarray, prompt_embeds: np.ndarray, seed: int):
        """IFPipeline's loop body at t = TIMESTEP (`prompt_embeds` = [negative; positive]); returns
        (run, unet_only): run() -> the next sample, with the scheduler's noise drawn from a generator
        seeded once with `seed`."""
        th = self.th
        xt, emb = th.from_numpy(x), th.from_numpy(prompt_embeds)
        t = self.scheduler.timesteps[int(np.nonzero(self.scheduler.timesteps.numpy() == TIMESTEP)[0][0])]
        gen = th.Generator().manual_seed(seed)

        def run():
            with th.no_grad():
                intermediate_images = xt
                model_input = th.cat([intermediate_images] * 2)
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise_pred = self.unet(model_input, t, encoder_hidden_states=emb, cross_attention_kwargs=None,
                                       return_dict=False)[0]
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred_uncond, _ = noise_pred_uncond.split(model_input.shape[1], dim=1)
                noise_pred_text, predicted_variance = noise_pred_text.split(model_input.shape[1], dim=1)
                noise_pred = noise_pred_uncond + GUIDANCE_SCALE * (noise_pred_text - noise_pred_uncond)
                noise_pred = th.cat([noise_pred, predicted_variance], dim=1)
                return self.scheduler.step(noise_pred, t, intermediate_images, generator=gen, return_dict=False)[0]

        def unet_only():
            with th.no_grad():
                return self.unet(th.cat([xt] * 2), t, encoder_hidden_states=emb, return_dict=False)[0]
        return run, unet_only


# --- jaxdiff ----------------------------------------------------------------------------------------------

def if_schedule(sched_cfg: dict):
    """jaxdiff's Schedule of IF's DDPMScheduler after set_timesteps(INFERENCE_STEPS): the "diffusers_ddpm"
    sampler's respacing ("leading", t = 0, 10, ..., 990) of the cosine schedule."""
    from jaxdiff.diffusion import samplers
    from jaxdiff.diffusion.schedules import make_schedule

    assert sched_cfg["beta_schedule"] == "squaredcos_cap_v2" and sched_cfg["timestep_spacing"] == "leading"
    assert sched_cfg["steps_offset"] == 0 and sched_cfg["prediction_type"] == "epsilon"
    n = sched_cfg["num_train_timesteps"]
    return make_schedule("cosine", n, samplers.SAMPLERS["diffusers_ddpm"].respacing(INFERENCE_STEPS))


class Jaxdiff:
    def __init__(self, fx: dict):
        from jaxdiff.convert.diffusers import unet2d_module, unet2d_params_from_state_dict
        from jaxdiff.convert.transformers import t5_params_from_state_dict
        from jaxdiff.diffusion import conditioning, guides, samplers
        from jaxdiff.models import t5
        from jaxdiff.util import cpu

        unet_cfg = common.config_of(fx, "unet1_config")
        self.unet = unet2d_module(unet_cfg)
        self.unet_params = jax.device_put(unet2d_params_from_state_dict(common.state_dict(fx, "unet1"), unet_cfg))
        self.t5_config = t5.t5_config_from_json(common.config_of(fx, "t5_config"))
        self.t5 = t5.T5Encoder(self.t5_config)
        self.t5_params = jax.device_put(t5_params_from_state_dict(common.state_dict(fx, "t5"), self.t5_config))
        self.encode_fn = t5.encode
        sched_cfg = common.config_of(fx, "scheduler_config")
        self.sched = if_schedule(sched_cfg)
        ratio, max_value = float(sched_cfg["dynamic_thresholding_ratio"]), float(sched_cfg["sample_max_value"])
        unet = self.unet
        x0_fn = guides.make_x0_fn(dynamic_threshold_percentile=ratio, dynamic_threshold_max=max_value)

        def prepare(params, states, cond):  # the cascade's once-per-call work: the U-Net's text conditioning
            return conditioning.text_prepare(unet, params, states)(cond)

        def step(params, x, i, cond, noise):  # the "diffusers_ddpm" sampler's loop body, as the cascade builds it
            guided = guides.classifier_free(conditioning.text_unet_fn(unet, params), uncond=conditioning.text_uncond,
                                            learned_sigma=True)
            i = jnp.broadcast_to(i, (x.shape[0],))
            d = samplers.denoise(guided, self.sched, x, i, cond, learned_sigma=True, x0_fn=x0_fn, guide_eps=False)
            return samplers.ddpm_step(self.sched, x, i, d, noise)

        self.prepare = cpu.jit(prepare)
        self.step_with_noise = cpu.jit(step)
        self.step = cpu.jit(lambda p, x, i, cond, key: step(p, x, i, cond, jax.random.normal(key, x.shape)))
        self.unet_fn = cpu.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))

    def encode(self, tokens, mask):
        return lambda: jax.block_until_ready(self.encode_fn(self.t5, self.t5_params, tokens, mask))


# --- timing -----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = common.reference_arguments(__doc__)
    p.add_argument("--batch", type=int, default=16, help="images per CFG step (the U-Net sees twice as many rows)")
    p.add_argument("--captions", type=int, default=64, help="captions per T5 encoding")
    args = p.parse_args(argv)
    if min(args.batch, args.captions, args.repeats, args.warmup, args.threads) < 1 or args.captions < args.batch:
        p.error("need --batch, --repeats, --warmup, --threads >= 1 and --captions >= --batch")
    th, diffusers, transformers = common.import_reference(args.refstack, args.gomp_spincount)
    th.set_num_threads(args.threads)
    th.manual_seed(0)
    fx = load_fixture()
    ref, ours = Reference(th, diffusers, transformers, fx), Jaxdiff(fx)
    from jaxdiff.diffusion import conditioning, guides
    from jaxdiff.util import cpu

    # inputs: captions (+ the empty one), their T5 states (PyTorch's: both U-Nets see the same arrays), x_t
    tokens, mask = captions(args.captions, ours.t5_config.vocab_size)
    states = ref.encode(tokens, mask)().numpy()
    b = args.batch
    cond_states, null_states = states[:b], np.repeat(states[-1:], b, axis=0)
    x = np.random.default_rng(1).standard_normal((b, 3, 16, 16)).astype(np.float32)
    i = np.int32(TIMESTEP // (1000 // INFERENCE_STEPS))
    # the stage sampler's cond after its once-per-call prepare: the table holds the b captions, then the empty one
    cond = ours.prepare(ours.unet_params, jnp.asarray(np.concatenate([states[:b], states[-1:]])),
                        {conditioning.PROMPT_KEY: jnp.arange(b, dtype=jnp.int32),
                         guides.CFG_SCALE: jnp.full((b,), GUIDANCE_SCALE, jnp.float32)})
    torch_step, torch_unet = ref.step_fn(x, np.concatenate([null_states, cond_states]), NOISE_SEED)

    # gate
    errs = ref.gate_fixture()
    enc = t5_tokens, t5_mask = tokens[:args.captions], mask[:args.captions]
    errs["t5_states"] = common.rel(ours.encode_fn(ours.t5, ours.t5_params, *enc), states[:args.captions])
    errs["empty_caption_states"] = common.rel(ours.encode_fn(ours.t5, ours.t5_params, tokens[-1:], mask[-1:]), states[-1:])
    rows = np.concatenate([null_states, cond_states])
    t_rows = jnp.full((2 * b,), TIMESTEP, jnp.int32)
    u = ours.unet_fn(ours.unet_params, jnp.asarray(common.nhwc(np.concatenate([x, x]))), t_rows, jnp.asarray(rows))
    errs["unet_2b_rows"] = common.rel(common.nchw(u), torch_unet().numpy())
    noise = th.randn(x.shape, generator=th.Generator().manual_seed(NOISE_SEED)).numpy()
    mine = ours.step_with_noise(ours.unet_params, jnp.asarray(common.nhwc(x)), i, cond, jnp.asarray(common.nhwc(noise)))
    errs["cfg_step"] = common.rel(common.nchw(mine), torch_step().numpy())  # the first draw of the seeded generator = noise
    gate = {"rel_errors": errs, "tolerance": TOLERANCE, "passed": all(v < TOLERANCE for v in errs.values())}
    out = {"benchmark": "DeepFloyd IF (if_tiny_a): CFG step and T5 encoding, jaxdiff vs diffusers/transformers "
                        "(PyTorch), alternated in one process",
           "torch": th.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "torch_threads": th.get_num_threads(), "refstack": args.refstack,
           "t5_attn_implementation": getattr(ref.t5.config, "_attn_implementation", None),
           "jaxdiff_compiled_with": f"jaxdiff.util.cpu.jit {cpu.compiler_options()}",
           "inputs": {"batch": b, "unet_rows": 2 * b, "image": [16, 16, 3], "context": [2 * b, LENGTH, 32],
                      "timestep": TIMESTEP, "inference_steps": INFERENCE_STEPS, "guidance_scale": GUIDANCE_SCALE,
                      "captions": args.captions, "tokens_per_caption": LENGTH,
                      "real_tokens_min_mean_max": [int(mask[:-1].sum(1).min()), float(mask[:-1].sum(1).mean()),
                                                   int(mask[:-1].sum(1).max())]},
           "gate": gate}
    status = common.stop_at_gate(out, args)
    if status is not None:
        return status
    key = jax.random.key(NOISE_SEED)
    xj = jnp.asarray(common.nhwc(x))
    jax_step = common.blocking(ours.step, ours.unet_params, xj, i, cond, key)
    table = {"cfg_step": common.duel(jax_step, torch_step, args.repeats, args.warmup),
             "t5_encode": common.duel(ours.encode(t5_tokens, t5_mask), ref.encode(t5_tokens, t5_mask), args.repeats,
                               args.warmup)}
    common.report(out, table, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
