"""unCLIP's (DALL-E 2's) prior on the captioned 8x8 digits: a small diffusers PriorTransformer (width 64, 2
layers, 2 heads, Karlo's prd token) that predicts the clean CLIP image embedding of a digit from its caption's
CLIP text embedding (proj_embedding) and token states (with their mask), as DALL-E 2's diffusion prior.
Run, in this order (each command resumes when rerun; docs/unclip_training.md):

    python train.py --config configs/digits_clip.py:unclip --workdir runs/digits_unclip/clip        # the CLIP pair
    python train.py --config configs/digits_unclip_prior.py --workdir runs/digits_unclip/prior       # this
    python train.py --config configs/digits_unclip_decoder.py --workdir runs/digits_unclip/decoder   # the decoder

The frozen CLIP is the clean "unclip" one (seed 2), never the evaluation CLIP. Its image embedding of every
training example and its text embedding and token states of every caption are computed once and cached in
runs/digits_unclip/text_states (shared with the decoder). Diffusion as diffusers' UnCLIPScheduler for the prior:
squaredcos_cap_v2 (the cosine schedule), 1000 steps, x_0 ("sample") prediction, MSE, fixed variance. The prior
works in normalised space: x_0 = (e - clip_mean) / clip_std with clip_mean / clip_std the per-dimension mean
and std of the training images' embeddings, computed once from the cache and stored as the prior's (frozen)
parameters, so diffusers' post_process_latents maps its samples back to CLIP space. Captions are dropped to the
empty caption's embedding, states and mask with probability diffusion.p_uncond (0.1) for classifier-free
guidance. The workdir also holds prior/config.json and prior_scheduler/config.json (diffusers' layout;
`jaxdiff.checkpoints.load_unclip`).
"""

from jaxdiff.train.config import default_config

CLIP_WORKDIR = "runs/digits_unclip/clip"
CACHE_DIR = "runs/digits_unclip/text_states"


def get_config():
    c = default_config("unclip_prior")  # x0 prediction, fixed variance, cosine 1000, p_uncond 0.1
    c.data.name = "digits_text"
    c.text_encoder.update(kind="clip", path=CLIP_WORKDIR, cache_dir=CACHE_DIR)
    c.model.update(num_attention_heads=2, attention_head_dim=32, num_layers=2)
    c.train.update(batch_size=128, steps=1500, lr=1e-3, warmup_steps=50, ema_decay=0.999, checkpoint_every=500,
                   keep=2)
    return c
