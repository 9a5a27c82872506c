"""openai/guided-diffusion's PyTorch models timed on this CPU, for comparison with jaxdiff; prints one JSON object.

    pip install torch==2.13.0      # CPU wheel; not an install requirement of jaxdiff (also: pip install -e .[torch])
    python bench/bench_torch_reference.py --check                          # correctness gate only
    python bench/bench_torch_reference.py [--batch 16,64] [--repeats 5] [--warmup 2] [--threads 2]
                                          [--weights fixture|random] [--train-loss hybrid|mse] [--ema]

guided-diffusion's source is not available offline, so this file holds a compact, faithful re-implementation
of its `UNetModel` and `EncoderUNetModel` (unet.py / nn.py at commit 22e0df8) for the flags of fixture A
(tests/fixtures/README.md; tests/_adm.py UNET_FLAGS, CLASSIFIER_FLAGS): ResBlock with scale-shift norm and
BigGAN up/down (resblock_updown), AttentionBlock with QKVAttentionLegacy, the classifier's AttentionPool2d with
QKVAttention (new order), GroupNorm32 in float32, zero-initialised output convs. Module names equal
guided-diffusion's, so its state_dicts load with strict=True. Branches for flags that fixture A does not use
(conv up/down, no scale-shift norm, new attention order in the blocks) are kept short but present.

Correctness gate (always run first, on the fixture's batch of 4; `--check` runs only it): the fixture's weights
are loaded and these must match guided-diffusion's stored outputs to relative error < 1e-4:
  unet_out            model(x, t, y)
  classifier_logits   classifier(x, t)
  cond_grad           scale * d/dx sum_i log_softmax(classifier(x, t))[i, y_i]  (guided-diffusion's cond_fn)
  ddim10/ddim_guided, 10/ddim_guided
                      the whole 10-step classifier-guided DDIM loop (eta 0) from x_T, i.e. the timed step
                      below, run through guided-diffusion's respacing (the model sees timestep_map[i]).
                      "10" includes t = 999, which is ill-conditioned in float32: bound 1e-3 (see TOLERANCES).
Timings are not reported if the gate fails (exit status 1).

Timings (float32, torch.set_num_threads(--threads), milliseconds; median over --repeats after --warmup calls;
wall time, plus process CPU time of all threads, which time-slicing with other processes barely changes):
  unet_forward_ms          one U-Net forward under torch.no_grad
  guidance_gradient_ms     one cond_fn call: classifier gradient of sum_i log p(y_i | x_t) w.r.t. x, times scale
  classifier_guided_ddim_step_ms
                           one DDIM step (eta 0) with classifier guidance, exactly as guided-diffusion's
                           ddim_sample + condition_score: model forward (under no_grad, learned sigma: eps is
                           the first 3 channels, the variance is computed as p_mean_variance does), x0 from eps
                           clipped to [-1, 1], eps recomputed from the clipped x0, eps' = eps - sqrt(1-abar) grad,
                           x0' from eps' (guided-diffusion does not clip again here), DDIM update.
                           Respacing "10" (space_timesteps), step i = 5, as bench/bench_sampling.py.
  train_step_ms            one U-Net training step as guided-diffusion's TrainLoop (batch of images in [-1, 1],
                           labels, uniform t, q_sample): forward, loss, backward, torch.optim.AdamW (lr 1e-4,
                           weight_decay 0.0 = guided-diffusion's default). --train-loss hybrid (default):
                           guided-diffusion's learned-sigma loss, MSE on eps + vb term (KL / decoder NLL with
                           the mean frozen), as jaxdiff's bench_training fixture_a_unet; mse: MSE on eps only.
                           --ema adds guided-diffusion's EMA update (rate 0.9999) to the step (jaxdiff's
                           bench_training includes EMA). The JSON says which. Not included: TrainLoop's
                           logging (loss dicts, per-parameter grad/param norms with .item()).
Timings only mean something on an otherwise idle machine: the JSON records the load average at start and end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

try:
    import torch as th
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:  # pragma: no cover
    sys.exit("PyTorch is needed: pip install torch==2.13.0 (CPU wheel)")

from common import CLASSIFIER_FLAGS, FIXTURE, UNET_FLAGS, cpu_model  # noqa: E402

TOLERANCE = 1e-4
# Respacing "10" keeps t = 999, where the cosine schedule's alpha_bar is ~1e-9 and x0 = (x - sqrt(1-abar) eps)
# / sqrt(abar) amplifies float32 rounding: guided-diffusion's own float32 result and this file's both differ from
# a float64 run by 1.4e-4 (and from each other by 7e-5), so that loop gets a looser bound. Everything else: 1e-4.
TOLERANCES = {"unet_out": TOLERANCE, "classifier_logits": TOLERANCE, "cond_grad": TOLERANCE,
              "ddim10/ddim_guided": TOLERANCE, "10/ddim_guided": 1e-3}


# ----------------------------------------------------------------------------------------------------------
# guided_diffusion/nn.py
# ----------------------------------------------------------------------------------------------------------

class SiLU(nn.Module):
    def forward(self, x):
        return x * th.sigmoid(x)


class GroupNorm32(nn.GroupNorm):
    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(channels):
    return GroupNorm32(32, channels)


def zero_module(module):
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = th.exp(-math.log(max_period) * th.arange(start=0, end=half, dtype=th.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = th.cat([th.cos(args), th.sin(args)], dim=-1)
    if dim % 2:
        embedding = th.cat([embedding, th.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


# ----------------------------------------------------------------------------------------------------------
# guided_diffusion/unet.py (2-D only, no gradient checkpointing, float32)
# ----------------------------------------------------------------------------------------------------------

class TimestepBlock(nn.Module):
    pass


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        self.channels, self.out_channels, self.use_conv = channels, out_channels or channels, use_conv
        if use_conv:
            self.conv = nn.Conv2d(self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels, use_conv, out_channels=None):
        super().__init__()
        self.channels, self.out_channels, self.use_conv = channels, out_channels or channels, use_conv
        if use_conv:
            self.op = nn.Conv2d(self.channels, self.out_channels, 3, stride=2, padding=1)
        else:
            assert self.channels == self.out_channels
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, up=False, down=False):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), SiLU(),
                                       nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(normalization(self.out_channels), SiLU(), nn.Dropout(p=dropout),
                                        zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x, emb):
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_rest(x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = in_conv(h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = th.chunk(emb_out, 2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
            h = out_rest(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """QKV attention; input [N, H*3*C, T] split heads first, then q, k, v."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = th.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = th.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = th.einsum("bts,bcs->bct", weight, v)
        return a.reshape(bs, -1, length)


class QKVAttention(nn.Module):
    """QKV attention; input [N, 3*H*C, T] split q, k, v first, then heads."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.chunk(3, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = th.einsum("bct,bcs->bts", (q * scale).view(bs * self.n_heads, ch, length),
                           (k * scale).view(bs * self.n_heads, ch, length))
        weight = th.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = th.einsum("bts,bcs->bct", weight, v.reshape(bs * self.n_heads, ch, length))
        return a.reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_new_attention_order=False):
        super().__init__()
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.attention = (QKVAttention if use_new_attention_order else QKVAttentionLegacy)(self.num_heads)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None):
        super().__init__()
        self.positional_embedding = nn.Parameter(th.randn(embed_dim, spacial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x):
        b, c, *_spatial = x.shape
        x = x.reshape(b, c, -1)
        x = th.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None, :, :].to(x.dtype)
        x = self.c_proj(self.attention(self.qkv_proj(x)))
        return x[:, :, 0]


def _encoder_trunk(self, in_channels, model_channels, num_res_blocks, attention_resolutions, dropout,
                   channel_mult, conv_resample, num_heads, num_head_channels, use_scale_shift_norm,
                   resblock_updown, use_new_attention_order, time_embed_dim):
    """input_blocks and middle_block, shared by UNetModel and EncoderUNetModel; returns (ch, ds, chans)."""
    ch = int(channel_mult[0] * model_channels)
    self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
    input_block_chans, ds = [ch], 1
    attn = lambda c: AttentionBlock(c, num_heads=num_heads, num_head_channels=num_head_channels,
                                    use_new_attention_order=use_new_attention_order)
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers = [ResBlock(ch, time_embed_dim, dropout, out_channels=int(mult * model_channels),
                               use_scale_shift_norm=use_scale_shift_norm)]
            ch = int(mult * model_channels)
            if ds in attention_resolutions:
                layers.append(attn(ch))
            self.input_blocks.append(TimestepEmbedSequential(*layers))
            input_block_chans.append(ch)
        if level != len(channel_mult) - 1:
            self.input_blocks.append(TimestepEmbedSequential(
                ResBlock(ch, time_embed_dim, dropout, out_channels=ch, use_scale_shift_norm=use_scale_shift_norm,
                         down=True) if resblock_updown else Downsample(ch, conv_resample, out_channels=ch)))
            input_block_chans.append(ch)
            ds *= 2
    self.middle_block = TimestepEmbedSequential(
        ResBlock(ch, time_embed_dim, dropout, use_scale_shift_norm=use_scale_shift_norm), attn(ch),
        ResBlock(ch, time_embed_dim, dropout, use_scale_shift_norm=use_scale_shift_norm))
    return ch, ds, input_block_chans


class UNetModel(nn.Module):
    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, num_classes=None, num_heads=1,
                 num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.model_channels, self.num_classes = model_channels, num_classes
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)
        ch, ds, input_block_chans = _encoder_trunk(
            self, in_channels, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult,
            conv_resample, num_heads, num_head_channels, use_scale_shift_norm, resblock_updown,
            use_new_attention_order, time_embed_dim)
        input_ch = int(channel_mult[0] * model_channels)
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [ResBlock(ch + ich, time_embed_dim, dropout, out_channels=int(model_channels * mult),
                                   use_scale_shift_norm=use_scale_shift_norm)]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads_upsample, num_head_channels=num_head_channels,
                                                 use_new_attention_order=use_new_attention_order))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, time_embed_dim, dropout, out_channels=ch,
                                           use_scale_shift_norm=use_scale_shift_norm, up=True)
                                  if resblock_updown else Upsample(ch, conv_resample, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), SiLU(),
                                 zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1)))

    def forward(self, x, timesteps, y=None):
        assert (y is not None) == (self.num_classes is not None)
        hs = []
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(th.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


class EncoderUNetModel(nn.Module):
    """The half U-Net classifier; pool="attention" only (the one fixture A and the released classifiers use)."""

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, num_heads=1, num_head_channels=-1,
                 use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False,
                 pool="adaptive"):
        super().__init__()
        assert pool == "attention" and num_head_channels != -1, "only pool='attention' is implemented"
        self.model_channels = model_channels
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        ch, ds, _ = _encoder_trunk(
            self, in_channels, model_channels, num_res_blocks, attention_resolutions, dropout, channel_mult,
            conv_resample, num_heads, num_head_channels, use_scale_shift_norm, resblock_updown,
            use_new_attention_order, time_embed_dim)
        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels))

    def forward(self, x, timesteps):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
        h = self.middle_block(h, emb)
        return self.out(h)


# ----------------------------------------------------------------------------------------------------------
# guided_diffusion/gaussian_diffusion.py (+ respace.py, losses.py), for the parts timed here
# ----------------------------------------------------------------------------------------------------------

def _extract(arr, t, ndim=4):
    res = th.from_numpy(arr)[t].float()
    return res.reshape(res.shape + (1,) * (ndim - 1))


class Diffusion:
    """GaussianDiffusion(learned_range variance, epsilon mean, MSE loss, rescale_timesteps False), optionally
    respaced: betas are the respaced ones and the model sees timestep_map[t] (SpacedDiffusion's _WrappedModel)."""

    def __init__(self, betas, timestep_map=None):
        b = np.asarray(betas, np.float64)
        self.betas, self.num_timesteps = b, len(b)
        self.timestep_map = th.as_tensor(np.arange(len(b)) if timestep_map is None else np.asarray(timestep_map))
        alphas = 1.0 - b
        ac = np.cumprod(alphas)
        acp = np.append(1.0, ac[:-1])
        self.alphas_cumprod, self.alphas_cumprod_prev = ac, acp
        self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod = np.sqrt(ac), np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod, self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac), np.sqrt(1.0 / ac - 1)
        pv = b * (1.0 - acp) / (1.0 - ac)
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:]))
        self.posterior_mean_coef1 = b * np.sqrt(acp) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * np.sqrt(alphas) / (1.0 - ac)
        self.log_betas = np.log(b)

    def q_sample(self, x_start, t, noise):
        return _extract(self.sqrt_alphas_cumprod, t) * x_start + _extract(self.sqrt_one_minus_alphas_cumprod, t) * noise

    def q_posterior_mean_log_variance(self, x_start, x_t, t):
        mean = _extract(self.posterior_mean_coef1, t) * x_start + _extract(self.posterior_mean_coef2, t) * x_t
        return mean, _extract(self.posterior_log_variance_clipped, t)

    def predict_xstart_from_eps(self, x_t, t, eps):
        return _extract(self.sqrt_recip_alphas_cumprod, t) * x_t - _extract(self.sqrt_recipm1_alphas_cumprod, t) * eps

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((_extract(self.sqrt_recip_alphas_cumprod, t) * x_t - pred_xstart)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t))

    def p_mean_variance_from_output(self, model_output, x, t, clip_denoised):
        C = x.shape[1]
        eps, var_values = th.split(model_output, C, dim=1)
        min_log = _extract(self.posterior_log_variance_clipped, t)
        max_log = _extract(self.log_betas, t)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _ = self.q_posterior_mean_log_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": th.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def ddim_sample(self, model, x, t, y, cond_fn=None, clip_denoised=True, eta=0.0):
        """One guided-diffusion ddim_sample (+ condition_score); callers run it under th.no_grad()."""
        mt = self.timestep_map[t]
        out = self.p_mean_variance_from_output(model(x, mt, y), x, t, clip_denoised)
        if cond_fn is not None:  # condition_score
            alpha_bar = _extract(self.alphas_cumprod, t)
            eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
            eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, mt, y)
            out["pred_xstart"] = self.predict_xstart_from_eps(x, t, eps)
            out["mean"], _ = self.q_posterior_mean_log_variance(out["pred_xstart"], x, t)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar, alpha_bar_prev = _extract(self.alphas_cumprod, t), _extract(self.alphas_cumprod_prev, t)
        sigma = eta * th.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * th.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = th.randn_like(x)  # drawn even at eta 0, as guided-diffusion does
        mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_prev) + th.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        nonzero_mask = (t != 0).float().view(-1, 1, 1, 1)
        return mean_pred + nonzero_mask * sigma * noise

    def ddim_sample_loop(self, model, x_T, y, cond_fn=None):
        img = x_T
        with th.no_grad():
            for i in reversed(range(self.num_timesteps)):
                img = self.ddim_sample(model, img, th.full((x_T.shape[0],), i, dtype=th.long), y, cond_fn)
        return img

    def training_losses(self, model, x_start, t, y, hybrid=True):
        """guided-diffusion training_losses for LossType.MSE, ModelMeanType.EPSILON, learned_range variance."""
        noise = th.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.timestep_map[t], y)
        C = x_t.shape[1]
        eps, var_values = th.split(model_output, C, dim=1)
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        if not hybrid:
            return mse
        frozen_out = th.cat([eps.detach(), var_values], dim=1)
        true_mean, true_log_var = self.q_posterior_mean_log_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(frozen_out, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]).mean(dim=(1, 2, 3)) / np.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = nll.mean(dim=(1, 2, 3)) / np.log(2.0)
        return mse + th.where(t == 0, nll, kl)


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + th.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * th.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + th.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * th.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    centered_x = x - means
    inv_stdv = th.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = th.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = th.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return th.where(x < -0.999, log_cdf_plus,
                    th.where(x > 0.999, log_one_minus_cdf_min, th.log(cdf_delta.clamp(min=1e-12))))


def make_cond_fn(classifier, scale):
    """scripts/classifier_sample.py's cond_fn."""

    def cond_fn(x, t, y):
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return th.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


# ----------------------------------------------------------------------------------------------------------
# fixture, check, timing
# ----------------------------------------------------------------------------------------------------------

def load_fixture():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def build_models(fx, weights="fixture", seed=0):
    unet, classifier = UNetModel(**UNET_FLAGS), EncoderUNetModel(**CLASSIFIER_FLAGS)
    for model, prefix in ((unet, "unet"), (classifier, "classifier")):
        if weights == "fixture":
            sd = {k[len(prefix) + 1:]: th.from_numpy(v) for k, v in fx.items() if k.startswith(prefix + "/")}
            model.load_state_dict(sd, strict=True)
        else:  # guided-diffusion's init, then every parameter perturbed (zero-initialised layers included)
            g = th.Generator().manual_seed(seed)
            with th.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * th.randn(p.shape, generator=g))
    return unet, classifier


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check(fx):
    """Relative errors against guided-diffusion's outputs (fixture weights, batch 4)."""
    unet, classifier = build_models(fx, "fixture")
    unet.eval(), classifier.eval()
    x, t, y = (th.from_numpy(fx[k]) for k in ("x", "t", "y"))
    scale = float(fx["classifier_scale"])
    cond_fn = make_cond_fn(classifier, scale)
    with th.no_grad():
        errs = {"unet_out": rel_err(unet(x, t, y), fx["unet_out"]),
                "classifier_logits": rel_err(classifier(x, t), fx["classifier_logits"])}
    errs["cond_grad"] = rel_err(cond_fn(x, t, y), fx["cond_grad"])
    x_T = th.from_numpy(fx["x_T"])
    for r in ("ddim10", "10"):
        diff = Diffusion(fx[f"{r}/betas"], fx[f"{r}/timestep_map"])
        errs[f"{r}/ddim_guided"] = rel_err(diff.ddim_sample_loop(unet, x_T, y, cond_fn), fx[f"{r}/ddim_guided"])
    return errs


def check_report(fx) -> dict:
    """`check(fx)`'s relative errors with the tolerances and whether every one is within them."""
    errs = check(fx)
    return {"rel_errors": errs, "tolerances": TOLERANCES, "passed": all(v < TOLERANCES[k] for k, v in errs.items())}


def timeit(fn, repeats, warmup):
    """(median wall ms, median process-CPU ms over all threads) of fn() after `warmup` calls."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return round(statistics.median(wall), 3), round(statistics.median(cpu), 3)


def make_train_step(fx, unet, B, *, ema: bool, hybrid: bool, generator=None):
    """(train_step, losses): one guided-diffusion training step of `unet` on a fixed batch of B
    random images (forward, hybrid or MSE loss at uniform t, backward, AdamW, optional EMA);
    each call appends its loss to `losses` (which also waits for the step to finish)."""
    g = generator if generator is not None else th.Generator().manual_seed(0)
    train_diff = Diffusion(fx["betas"])  # 1000 steps, cosine
    unet.train()  # dropout 0: same computation
    opt = th.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.0)
    ema_params = [p.detach().clone() for p in unet.parameters()] if ema else None
    images = th.rand((B, 3, 32, 32), generator=g) * 2 - 1
    y = th.arange(B) % 10
    rs = np.random.RandomState(0)
    losses = []

    def train_step():
        for p in unet.parameters():  # guided-diffusion's MixedPrecisionTrainer.zero_grad
            if p.grad is not None:
                p.grad.detach_()
                p.grad.zero_()
        ts = th.from_numpy(rs.choice(train_diff.num_timesteps, size=(B,))).long()  # UniformSampler
        loss = train_diff.training_losses(unet, images, ts, y, hybrid=hybrid).mean()
        loss.backward()
        opt.step()
        if ema_params is not None:  # update_ema(rate=0.9999)
            with th.no_grad():
                for targ, src in zip(ema_params, unet.parameters()):
                    targ.mul_(0.9999).add_(src, alpha=1 - 0.9999)
        losses.append(float(loss.detach()))

    return train_step, losses


def bench_batch(fx, B, args):
    unet, classifier = build_models(fx, args.weights)
    scale = float(fx["classifier_scale"])
    cond_fn = make_cond_fn(classifier, scale)
    diff = Diffusion(fx["10/betas"], fx["10/timestep_map"])  # respacing "10", as bench_sampling.py
    g = th.Generator().manual_seed(0)
    x = th.randn((B, 3, 32, 32), generator=g)
    y = th.arange(B) % 10
    i = th.full((B,), diff.num_timesteps // 2, dtype=th.long)
    t = diff.timestep_map[i]
    res = {"batch": B}

    unet.eval(), classifier.eval()

    def unet_forward():
        with th.no_grad():
            return unet(x, t, y)

    def guided_step():
        with th.no_grad():
            return diff.ddim_sample(unet, x, i, y, cond_fn=cond_fn)

    for name, fn in (("unet_forward", unet_forward), ("guidance_gradient", lambda: cond_fn(x, t, y)),
                     ("classifier_guided_ddim_step", guided_step)):
        res[f"{name}_ms"], res[f"{name}_cpu_ms"] = timeit(fn, args.repeats, args.warmup)

    train_step, losses = make_train_step(fx, unet, B, ema=args.ema, hybrid=args.train_loss == "hybrid", generator=g)
    res["train_step_ms"], res["train_step_cpu_ms"] = timeit(train_step, args.repeats, args.warmup)
    res["train_loss_last"] = round(losses[-1], 5)
    return res


def machine():
    model = cpu_model()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": model, "cores_online": os.cpu_count(), "cores_usable": usable, "platform": platform.platform(),
            "python": platform.python_version(), "torch_cpu_capability": th.backends.cpu.get_cpu_capability(),
            "mkldnn": th.backends.mkldnn.is_available()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only the correctness gate (fixture batch of 4)")
    ap.add_argument("--batch", default="16,64", help="comma list of batch sizes (default 16,64)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--weights", choices=("fixture", "random"), default="fixture",
                    help="fixture A's weights, or guided-diffusion's init perturbed (timing does not depend on it)")
    ap.add_argument("--train-loss", choices=("hybrid", "mse"), default="hybrid",
                    help="hybrid: MSE on eps + vb term (guided-diffusion, learned sigma); mse: MSE on eps only")
    ap.add_argument("--ema", action="store_true", help="include the EMA update (rate 0.9999) in train_step")
    args = ap.parse_args(argv)
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    th.set_num_threads(args.threads)
    th.manual_seed(0)

    fx = load_fixture()
    report = check_report(fx)
    passed = report["passed"]
    res = {"benchmark": "guided_diffusion_torch_reference", "torch": th.__version__, "threads": th.get_num_threads(),
           "interop_threads": th.get_num_interop_threads(), "dtype": "float32", "machine": machine(),
           "load_average_start": load_start,
           "check": report}
    if not args.check and passed:
        res.update(weights=args.weights, repeats=args.repeats, warmup=args.warmup, image_shape=[3, 32, 32],
                   ddim_respacing="10", ddim_step_index=5, ddim_eta=0.0,
                   classifier_scale=float(fx["classifier_scale"]),
                   train_step_includes=("forward, " + ("MSE on eps + vb term (hybrid)" if args.train_loss == "hybrid"
                                                       else "MSE on eps only") + ", backward, AdamW(lr 1e-4, "
                                        "weight_decay 0)" + (", EMA update" if args.ema else ", no EMA")),
                   results=[bench_batch(fx, int(b), args) for b in args.batch.split(",") if b.strip()])
    res["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(json.dumps(res, indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
