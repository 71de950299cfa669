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


# --- the flow-matching variant (denoiser: transformer) ------------------------------------------
# the T5 encoder's zero tokens, trained as one token counted 256 times: tn_ray.diffusion.null_tokens


def transformer(cfg: WorldGeneratorConfig):
    """The SD3Transformer2DModel (MMDiT, SD 3.0's: no dual attention, no qk norm) over the latent of
    ``cfg.autoencoder``, conditioned as StableDiffusion3Pipeline conditions it on two copies of the
    world text encoder: tokens of width 2 x text.hidden, a pooled vector of the same width."""
    from diffusers import SD3Transformer2DModel

    t = cfg.transformer
    tokens = cfg.latent_size // t.patch_size
    return SD3Transformer2DModel(
        sample_size=cfg.latent_size, patch_size=t.patch_size, in_channels=cfg.autoencoder.latent_channels,
        out_channels=cfg.autoencoder.latent_channels, num_layers=t.layers, attention_head_dim=t.head_dim,
        num_attention_heads=t.heads, joint_attention_dim=2 * cfg.text.hidden,
        caption_projection_dim=t.heads * t.head_dim, pooled_projection_dim=2 * cfg.text.hidden,
        pos_embed_max_size=tokens)


def flow_scheduler(cfg: WorldGeneratorConfig):
    """The training sigmas and the sampler shipped with the pipeline (the same config)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.train.shift)


def text_encoder_with_projection(text):
    """A ``CLIPTextModelWithProjection`` (what StableDiffusion3Pipeline needs) computing what the world
    ``CLIPTextModel`` ``text`` computes, for the pipeline's way of reading it.

    The pipeline reads the penultimate hidden state (``hidden_states[-2]``) and the projected pooled output.
    One layer is appended whose attention and MLP output projections are zero, an exact identity (each
    sub-block adds zero to the residual stream), so the penultimate state is the output of the world
    encoder's last layer (before its final layer norm) and the last hidden state and pooled output are the
    world encoder's own. The projection is the identity (projection_dim = width): the transformer's pooled
    embedder is a learned MLP, so a learned projection in front of it would add nothing."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    c = text.config.to_dict()
    c.update(num_hidden_layers=text.config.num_hidden_layers + 1, projection_dim=text.config.hidden_size)
    for key in ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype"):
        c.pop(key, None)
    out = CLIPTextModelWithProjection(CLIPTextConfig(**c)).to(text.dtype)
    source = getattr(text, "text_model", text)  # transformers 5: CLIPTextModel holds the text model's modules itself
    missing, unexpected = out.text_model.load_state_dict(source.state_dict(), strict=False)
    last = f"encoder.layers.{text.config.num_hidden_layers}."
    if unexpected or any(not k.startswith(last) for k in missing):
        raise ValueError(f"the world text encoder does not fit CLIPTextModelWithProjection: missing {missing}, "
                         f"unexpected {unexpected}")
    layer = out.text_model.encoder.layers[-1]
    with torch.no_grad():
        for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
            linear.weight.zero_()
            linear.bias.zero_()
        out.text_projection.weight.copy_(torch.eye(text.config.hidden_size))
    return out
