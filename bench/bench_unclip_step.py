"""unCLIP (Karlo) on the CPU, jaxdiff against diffusers (PyTorch), alternated in one process.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python bench/bench_unclip_step.py [--refstack /opt/refstack] \
        [--decoder-batch 16] [--prior-batch 64] [--repeats 15] [--warmup 3] [--threads 2] [--wait-idle 85] \
        [--check] [--markdown]

The models are tests/fixtures/unclip_tiny_a.npz's (/work/shared/fixtures/cascade/README.md): the decoder
`UNet2DConditionModel` (`decoder_config`, 16x16, learned-range variance, the CLIP time embedding as class
labels, 14 context tokens with a mask) and the `PriorTransformer` (`prior_config`), built on each side from
the stored config.json with the same weights (diffusers' `from_config` + load_state_dict(strict=True);
jaxdiff's converters). float32 on both sides.

Timed, each as jaxdiff and as PyTorch, called in turn:
  decoder_step  one step of UnCLIPPipeline's decoder loop at `--decoder-batch` images: the U-Net on the 2B rows
                [uncond; cond] (text_proj's hidden states and additive time embeddings, the unconditional half
                from the learned null image embedding and the empty caption; both compute them once before the
                loop: jaxdiff's sampler in its `decoder_prepare`, which also computes the U-Net's text keys and
                values there, where diffusers' U-Net recomputes them at every step), CFG 8 on eps, the
                variance channels from the conditional half, then UnCLIPScheduler.step (learned range, x0 clipped to [-1, 1]) at step 12
                of Karlo's 25, noise drawn inside the step.
  prior_step    one step of the prior loop at `--prior-batch` embeddings: the PriorTransformer on 2B rows
                (CLIP text embeddings, token states and masks of [empty caption; captions]), CFG 4, then
                UnCLIPScheduler.step (sample prediction, fixed small log variance, clip range 5).
PyTorch runs the pipeline's loop bodies under torch.no_grad; jaxdiff one `jaxdiff.util.cpu.jit` function per
step built from the samplers `sample/unclip.py` uses (its model functions and CFG, `samplers.denoise`,
`samplers.ddpm_step` on the "unclip" schedule).

Gate (always first; `--check` runs only it): PyTorch's models reproduce the fixture, and jaxdiff's step agrees
with PyTorch's on the benchmarked inputs with the same noise, max |a - b| / max |b| < 1e-4 (exit status 1
otherwise, nothing timed). The reference stack: `pip install --target /opt/refstack torch==2.13.0
diffusers==0.42.1 transformers==5.23.0` (appended to sys.path). Load: see bench_if_step.py (`--wait-idle`).
"""

from __future__ import annotations

import sys

import common  # first: puts this checkout's jaxdiff on sys.path
import jax
import jax.numpy as jnp
import numpy as np

FIXTURE = common.ROOT / "tests" / "fixtures" / "unclip_tiny_a.npz"
TOLERANCE = 1e-4
DECODER_SCALE, PRIOR_SCALE = 8.0, 4.0   # UnCLIPPipeline's defaults
STEPS = 25                              # Karlo's prior and decoder inference steps
STEP_INDEX = 12                         # the timed step: the 13th of the 25 (t = 500)
NOISE_SEED = 1234


def load_fixture() -> dict:
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def inputs(fx: dict, decoder_batch: int, prior_batch: int) -> dict:
    """Deterministic inputs: CLIP text outputs of `max(batches)` captions (random, masks with 3..10 real
    tokens) plus the empty caption's from the fixture, image embeddings, x_t of both stages."""
    rng = np.random.default_rng(0)
    n = max(decoder_batch, prior_batch)
    length, width = fx["clip_last_hidden_state"].shape[1:]
    real = rng.integers(3, length + 1, size=n)
    mask = np.arange(length)[None] < real[:, None]
    return {"embeds": rng.standard_normal((n, width)).astype(np.float32),
            "states": rng.standard_normal((n, length, width)).astype(np.float32), "mask": mask,
            "null_embeds": fx["clip_uncond_text_embeds"].astype(np.float32),
            "null_states": fx["clip_uncond_last_hidden_state"].astype(np.float32),
            "null_mask": fx["clip_uncond_mask"].astype(bool),
            "image_embeds": rng.standard_normal((n, width)).astype(np.float32),
            "decoder_x": rng.standard_normal((decoder_batch, 3, 16, 16)).astype(np.float32),
            "prior_x": rng.standard_normal((prior_batch, width)).astype(np.float32)}


# --- PyTorch: the pipeline's loop bodies ------------------------------------------------------------------

class Reference:
    def __init__(self, th, diffusers, fx: dict):
        self.th = th
        sd = lambda p: {k: th.from_numpy(v) for k, v in common.state_dict(fx, p).items()}  # noqa: E731
        self.decoder = diffusers.UNet2DConditionModel.from_config(common.config_of(fx, "decoder_config"))
        self.decoder.load_state_dict(sd("decoder"), strict=True)
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

        self.text_proj = UnCLIPTextProjModel.from_config(common.config_of(fx, "text_proj_config"))
        self.text_proj.load_state_dict(sd("text_proj"), strict=True)
        self.prior = diffusers.PriorTransformer.from_config(common.config_of(fx, "prior_config"))
        self.prior.load_state_dict(sd("prior"), strict=True)
        for m in (self.decoder, self.text_proj, self.prior):
            m.eval()
        self.decoder_scheduler = diffusers.UnCLIPScheduler.from_config(common.config_of(fx, "decoder_scheduler_config"))
        self.prior_scheduler = diffusers.UnCLIPScheduler.from_config(common.config_of(fx, "prior_scheduler_config"))
        for s in (self.decoder_scheduler, self.prior_scheduler):
            s.set_timesteps(STEPS)
        self.fx = fx

    def gate_fixture(self) -> dict:
        th, fx = self.th, self.fx
        t = lambda k: th.from_numpy(fx[k])  # noqa: E731
        with th.no_grad():
            d = self.decoder(t("decoder_x"), t("decoder_t"), encoder_hidden_states=t("text_proj_hidden_states"),
                             class_labels=t("text_proj_time_embeddings"),
                             attention_mask=t("decoder_attention_mask"), return_dict=False)[0]
            p = self.prior(t("prior_x"), t("prior_t"), proj_embedding=t("clip_text_embeds"),
                           encoder_hidden_states=t("clip_last_hidden_state"),
                           attention_mask=t("clip_mask")).predicted_image_embedding
        return {"torch_decoder_vs_fixture": common.rel(d, fx["decoder_out"]),
                "torch_prior_vs_fixture": common.rel(p, fx["prior_out"])}

    def _text(self, inp: dict, b: int):
        """[empty caption x b; captions] CLIP embeds, states, masks (the pipeline's CFG order)."""
        th = self.th
        cat = lambda null, cond: th.from_numpy(np.concatenate([np.repeat(null, b, 0), cond[:b]]))  # noqa: E731
        return (cat(inp["null_embeds"], inp["embeds"]), cat(inp["null_states"], inp["states"]),
                cat(inp["null_mask"], inp["mask"]))

    def decoder_step(self, inp: dict, b: int, seed: int):
        th, sched = self.th, self.decoder_scheduler
        embeds, states, mask = self._text(inp, b)
        with th.no_grad():  # before the loop, as UnCLIPPipeline
            image = th.from_numpy(inp["image_embeds"][:b])
            hidden, temb = self.text_proj(image_embeddings=image, prompt_embeds=embeds,
                                          text_encoder_hidden_states=states, do_classifier_free_guidance=True)
            n_extra = self.text_proj.clip_extra_context_tokens
            dmask = th.nn.functional.pad(mask, (n_extra, 0), value=True)
        x = th.from_numpy(inp["decoder_x"])
        t, prev = sched.timesteps[STEP_INDEX], sched.timesteps[STEP_INDEX + 1]
        gen = th.Generator().manual_seed(seed)

        def run():
            with th.no_grad():
                model_input = th.cat([x] * 2)
                out = self.decoder(sample=model_input, timestep=t, encoder_hidden_states=hidden, class_labels=temb,
                                   attention_mask=dmask, return_dict=False)[0]
                uncond, text = out.chunk(2)
                uncond, _ = uncond.split(x.shape[1], dim=1)
                text, variance = text.split(x.shape[1], dim=1)
                eps = th.cat([uncond + DECODER_SCALE * (text - uncond), variance], dim=1)
                return sched.step(eps, t, x, prev_timestep=prev, generator=gen).prev_sample
        return run

    def prior_step(self, inp: dict, b: int, seed: int):
        th, sched = self.th, self.prior_scheduler
        embeds, states, mask = self._text(inp, b)
        x = th.from_numpy(inp["prior_x"])
        t, prev = sched.timesteps[STEP_INDEX], sched.timesteps[STEP_INDEX + 1]
        gen = th.Generator().manual_seed(seed)

        def run():
            with th.no_grad():
                out = self.prior(th.cat([x] * 2), timestep=t, proj_embedding=embeds, encoder_hidden_states=states,
                                 attention_mask=mask).predicted_image_embedding
                uncond, text = out.chunk(2)
                pred = uncond + PRIOR_SCALE * (text - uncond)
                return sched.step(pred, timestep=t, sample=x, generator=gen, prev_timestep=prev).prev_sample
        return run


# --- jaxdiff: the samplers' loop bodies -------------------------------------------------------------------

class Jaxdiff:
    def __init__(self, fx: dict, num_prompts: int):
        from jaxdiff.convert.diffusers import unet2d_module, unet2d_params_from_state_dict
        from jaxdiff.convert.unclip import prior_params_from_state_dict, text_proj_params_from_state_dict
        from jaxdiff.diffusion import guides, samplers
        from jaxdiff.diffusion.conditioning import PROMPT_KEY
        from jaxdiff.models.prior import PriorTransformer, prior_config
        from jaxdiff.models.unclip_text_proj import UnCLIPTextProjModel, text_proj_config
        from jaxdiff.sample import unclip
        from jaxdiff.util import cpu

        dcfg, pcfg, tcfg = (common.config_of(fx, k) for k in ("decoder_config", "prior_config", "text_proj_config"))
        self.decoder = unet2d_module(dcfg)
        self.text_proj = UnCLIPTextProjModel(text_proj_config(tcfg))
        self.prior = PriorTransformer(prior_config(pcfg))
        self.params = jax.device_put({  # on the device once, as the samplers hold them
            "decoder": unet2d_params_from_state_dict(common.state_dict(fx, "decoder"), dcfg),
            "text_proj": text_proj_params_from_state_dict(common.state_dict(fx, "text_proj"), tcfg),
            "prior": prior_params_from_state_dict(common.state_dict(fx, "prior"), pcfg)})
        self.sched = unclip.unclip_schedule(STEPS)
        self.i = STEPS - 1 - STEP_INDEX  # index into the respaced chain (0 = the last step)
        decoder, text_proj, prior = self.decoder, self.text_proj, self.prior
        x0_decoder = guides.make_x0_fn(clip_denoised=True)
        x0_prior = guides.make_x0_fn(clip_denoised=True, clip_range=unclip.PRIOR_CLIP_RANGE)
        sched = self.sched

        def decoder_step(params, x, cond, noise):  # cond: after the sampler's once-per-call decoder_prepare
            guided = guides.classifier_free(unclip.decoder_model_fn(decoder, params["decoder"]),
                                            uncond=unclip.decoder_uncond, learned_sigma=True)
            i = jnp.full((x.shape[0],), self.i, jnp.int32)
            d = samplers.denoise(guided, sched, x, i, cond, learned_sigma=True, x0_fn=x0_decoder, guide_eps=False)
            return samplers.ddpm_step(sched, x, i, d, noise, fixed_variance="small")

        def prior_step(params, text, x, cond, noise):
            fn = unclip.prior_model_fn(prior, params["prior"], text)
            guided = guides.classifier_free(fn, uncond=guides.label_dropout(num_prompts, PROMPT_KEY))
            i = jnp.full((x.shape[0],), self.i, jnp.int32)
            d = samplers.denoise(guided, sched, x, i, cond, prediction="x0", x0_fn=x0_prior, guide_eps=False)
            return samplers.ddpm_step(sched, x, i, d, noise, fixed_variance="small")

        self.decoder_prepare = cpu.jit(lambda p, tx, c: unclip.decoder_prepare(text_proj, p["text_proj"], decoder,
                                                                                 p["decoder"], tx, num_prompts)(c))
        self.decoder_step_with_noise = cpu.jit(decoder_step)
        prior_opts = unclip.prior_compiler_options()  # the prior sampler's
        self.prior_step_with_noise = cpu.jit(prior_step, compiler_options=prior_opts)
        self.decoder_step = cpu.jit(lambda p, x, c, key: decoder_step(p, x, c, jax.random.normal(key, x.shape)))
        self.prior_step = cpu.jit(lambda p, tx, x, c, key: prior_step(p, tx, x, c, jax.random.normal(key, x.shape)),
                                  compiler_options=prior_opts)


def text_table(inp: dict, n: int):
    """jaxdiff's table: the n captions' rows, then the empty caption's (row n)."""
    from jaxdiff.sample.unclip import TextTable

    return TextTable(*(jnp.asarray(np.concatenate([inp[k][:n], inp["null_" + k]])) for k in ("embeds", "states",
                                                                                               "mask")))


def main(argv=None) -> int:
    p = common.reference_arguments(__doc__)
    p.add_argument("--decoder-batch", type=int, default=16, help="images per decoder CFG step (2x rows)")
    p.add_argument("--prior-batch", type=int, default=64, help="embeddings per prior CFG step (2x rows)")
    args = p.parse_args(argv)
    if min(args.decoder_batch, args.prior_batch, args.repeats, args.warmup, args.threads) < 1:
        p.error("need --decoder-batch, --prior-batch, --repeats, --warmup, --threads >= 1")
    th, diffusers, _ = common.import_reference(args.refstack, args.gomp_spincount)
    th.set_num_threads(args.threads)
    th.manual_seed(0)
    fx = load_fixture()
    db, pb = args.decoder_batch, args.prior_batch
    inp = inputs(fx, db, pb)
    ref = Reference(th, diffusers, fx)
    from jaxdiff.diffusion import guides
    from jaxdiff.diffusion.conditioning import PROMPT_KEY
    from jaxdiff.sample.unclip import IMAGE_EMBED_KEY
    from jaxdiff.util import cpu

    ours = {b: Jaxdiff(fx, b) for b in {db, pb}}
    dec_text, pri_text = text_table(inp, db), text_table(inp, pb)
    dec_cond = {PROMPT_KEY: jnp.arange(db, dtype=jnp.int32), IMAGE_EMBED_KEY: jnp.asarray(inp["image_embeds"][:db]),
                guides.CFG_SCALE: jnp.full((db,), DECODER_SCALE, jnp.float32)}
    pri_cond = {PROMPT_KEY: jnp.arange(pb, dtype=jnp.int32), guides.CFG_SCALE: jnp.full((pb,), PRIOR_SCALE, jnp.float32)}
    dx, px = jnp.asarray(common.nhwc(inp["decoder_x"])), jnp.asarray(inp["prior_x"])
    torch_dec, torch_pri = ref.decoder_step(inp, db, NOISE_SEED), ref.prior_step(inp, pb, NOISE_SEED)

    errs = ref.gate_fixture()
    d_noise = th.randn(inp["decoder_x"].shape, generator=th.Generator().manual_seed(NOISE_SEED)).numpy()
    p_noise = th.randn(inp["prior_x"].shape, generator=th.Generator().manual_seed(NOISE_SEED)).numpy()
    od, op = ours[db], ours[pb]
    dec_cond = od.decoder_prepare(od.params, dec_text, dec_cond)  # once, as the pipeline before its loop
    mine = od.decoder_step_with_noise(od.params, dx, dec_cond, jnp.asarray(common.nhwc(d_noise)))
    errs["decoder_step"] = common.rel(common.nchw(mine), torch_dec().numpy())
    mine = op.prior_step_with_noise(op.params, pri_text, px, pri_cond, jnp.asarray(p_noise))
    errs["prior_step"] = common.rel(mine, torch_pri().numpy())
    gate = {"rel_errors": errs, "tolerance": TOLERANCE, "passed": all(v < TOLERANCE for v in errs.values())}
    out = {"benchmark": "unCLIP (unclip_tiny_a): decoder and prior CFG steps, jaxdiff vs diffusers (PyTorch), "
                        "alternated in one process",
           "torch": th.__version__, "diffusers": diffusers.__version__, "torch_threads": th.get_num_threads(),
           "refstack": args.refstack, "jaxdiff_compiled_with": f"jaxdiff.util.cpu.jit {cpu.compiler_options()}",
           "inputs": {"decoder_batch": db, "decoder_rows": 2 * db, "image": [16, 16, 3], "prior_batch": pb,
                      "prior_rows": 2 * pb, "steps": STEPS, "step_index": STEP_INDEX,
                      "timestep": int(ref.decoder_scheduler.timesteps[STEP_INDEX]),
                      "decoder_scale": DECODER_SCALE, "prior_scale": PRIOR_SCALE},
           "gate": gate}
    status = common.stop_at_gate(out, args)
    if status is not None:
        return status
    key = jax.random.key(NOISE_SEED)
    table = {"decoder_step": common.duel(common.blocking(od.decoder_step, od.params, dx, dec_cond, key),
                                         torch_dec, args.repeats, args.warmup),
             "prior_step": common.duel(common.blocking(op.prior_step, op.params, pri_text, px, pri_cond, key),
                                       torch_pri, args.repeats, args.warmup)}
    common.report(out, table, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
