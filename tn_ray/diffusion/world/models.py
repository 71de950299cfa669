"""The world generator's components, built from :class:`WorldGeneratorConfig` (untrained)."""
from __future__ import annotations

from tn_ray.diffusion.world.settings import WorldGeneratorConfig


def autoencoder(cfg: WorldGeneratorConfig):
    from diffusers import AutoencoderKL

    a = cfg.autoencoder
    return AutoencoderKL(
        sample_size=cfg.size, in_channels=3, out_channels=3, latent_channels=a.latent_channels,
        block_out_channels=a.channels, layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * len(a.channels),
        up_block_types=("UpDecoderBlock2D",) * len(a.channels), mid_block_add_attention=False)


def text_encoder(cfg: WorldGeneratorConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    t = cfg.text
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=t.hidden, intermediate_size=4 * t.hidden,
        num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def unet(cfg: WorldGeneratorConfig):
    from diffusers import UNet2DConditionModel

    u = cfg.unet
    n = len(u.channels)
    attn = [i >= u.attention_from for i in range(n)]
    return UNet2DConditionModel(
        sample_size=cfg.latent_size, in_channels=cfg.autoencoder.latent_channels,
        out_channels=cfg.autoencoder.latent_channels, block_out_channels=u.channels,
        layers_per_block=u.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        cross_attention_dim=cfg.text.hidden, attention_head_dim=u.heads, norm_num_groups=32)


def scheduler_config(cfg: WorldGeneratorConfig) -> dict:
    """Shared by the DDPM training scheduler and the DDIM sampler saved with the pipeline."""
    return dict(num_train_timesteps=1000, beta_schedule=cfg.train.beta_schedule,
                prediction_type=cfg.train.prediction_type, clip_sample=False)


def ddim_scheduler(cfg: WorldGeneratorConfig):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**scheduler_config(cfg), set_alpha_to_one=False, steps_offset=1)


def ddpm_scheduler(cfg: WorldGeneratorConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**scheduler_config(cfg))
