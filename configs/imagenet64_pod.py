"""ADM's class-conditional ImageNet 64x64 model (guided-diffusion's released flags) for a TPU pod
slice or a multi-GPU host, with label dropout for classifier-free guidance.

    python train.py --config configs/imagenet64_pod.py --workdir gs://BUCKET/imagenet64

Needs `imagenet_resized/64x64` prepared as array_record in config.data.data_dir (tfds build
imagenet_resized/64x64 --file_format=array_record, on a machine with TensorFlow). ADM trained
with batch 2048 for 540k steps; here every device of the slice holds a quarter of the train state
(mesh.fsdp=4; any divisor of the device count works, e.g. --config.mesh.fsdp=16 on 16 chips),
computes in bfloat16 with remat, and 4 micro-batches make each step, so 2048 images need
2048 / 4 / devices per device and micro-batch (16 on 32 chips). 16 decode threads per host.
Adjust to the slice: --config.train.batch_size, --config.train.grad_accum_steps, --config.mesh.fsdp.
Sizes: docs/training.md.
"""

from jaxdiff.train.config import default_config


def get_config():
    c = default_config("diffusion")
    c.data.update(name="imagenet_resized/64x64", augment=True, workers=16)
    c.model.update(model_channels=192, num_res_blocks=3, attention_resolutions=(2, 4, 8), channel_mult=(1, 2, 3, 4),
                   num_heads=4, num_head_channels=64, dropout=0.1, use_scale_shift_norm=True, resblock_updown=True,
                   use_new_attention_order=True, dtype="bfloat16", use_checkpoint=True)
    c.diffusion.update(schedule="cosine", num_timesteps=1000, prediction="eps", learned_sigma=True, p_uncond=0.1)
    c.train.update(batch_size=2048, grad_accum_steps=4, steps=540000, lr=3e-4, warmup_steps=0, lr_schedule="constant",
                   weight_decay=0.0, grad_clip=0.0, ema_decay=0.9999, ema_warmup=False, log_every=100,
                   checkpoint_every=2000, keep=3, sample_every=10000)
    c.mesh.update(fsdp=4)
    c.sample.update(sampler="ddim", steps=50, guidance_scale=1.5, per_class=4, grid_classes=16)
    return c
