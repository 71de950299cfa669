"""Real-size architectures from their published configs, with random weights: no download.

Compute and memory do not depend on the values of the weights, so Stable Diffusion 2.1 and 3.5
Medium built here from the configs their authors published cost what the real models cost
(``benchmarks/bench_scale.py``, docs/performance.md). Each config below names the Hugging Face
repository and file its values come from; only keys that change shapes or compute are written
(the rest are the classes' defaults, equal to the published files). Token ids follow the CLIP BPE
tokenizer built offline (:func:`tn_ray.rewards.bpe.clip_vocab_and_merges`), as the ``tiny`` pipeline.

Weights: the classes are built with initialization switched off (transformers'
``no_init_weights``, which also stubs ``torch.nn.init``), directly in the requested dtype, and every
parameter is then filled from one seeded generator: matrices and convolutions ~ N(0, 1/fan_in),
one-dimensional weights (norm scales) 1, biases 0. Activations stay of unit scale through the
depth, so no value is NaN or infinite and every compute path is the real one. Buffers (position
ids, sinusoidal tables) are the classes' own.

Reward models at real size need nothing here: ``clip:ViT-B-32/random``, ``clip:ViT-H-14/random``
(PickScore's architecture, open_clip's ``ViT-H-14`` config) and ``imagereward:random`` (its
published med_config.json, in ``tn_ray/rewards/configs/``) are the registry's own specs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from tn_ray.errors import TnRayError

# --- Stable Diffusion 2.1 -----------------------------------------------------------------
SD21_SOURCE = {
    "unet": "stabilityai/stable-diffusion-2-1-base/unet/config.json (512 px) and stabilityai/stable-diffusion-2-1/"
            "unet/config.json (768 px; the same but sample_size 96 and upcast_attention true)",
    "vae": "stabilityai/stable-diffusion-2-1/vae/config.json",
    "text_encoder": "stabilityai/stable-diffusion-2-1/text_encoder/config.json (OpenCLIP ViT-H/14 text tower, "
                    "penultimate layer: 23 of 24 layers)",
    "scheduler": "stabilityai/stable-diffusion-2-1/scheduler/scheduler_config.json (DDIMScheduler, v_prediction); "
                 "-base: epsilon",
}
SD21_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, norm_num_groups=32,
    act_fn="silu", flip_sin_to_cos=True, freq_shift=0)
SD_VAE = dict(  # SD 1.x / 2.x VAE (kl-f8)
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", scaling_factor=0.18215)
SD21_TEXT = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512)
SD21_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)

# --- Stable Diffusion 3.5 Medium ------------------------------------------------------------
SD35M_SOURCE = {
    "transformer": "stabilityai/stable-diffusion-3.5-medium/transformer/config.json (MMDiT-X; 2.24 B parameters built "
                   "here)",
    "vae": "stabilityai/stable-diffusion-3.5-medium/vae/config.json (16 latent channels)",
    "text_encoder": "stabilityai/stable-diffusion-3.5-medium/text_encoder/config.json (CLIP ViT-L/14 text, with "
                    "projection)",
    "text_encoder_2": "stabilityai/stable-diffusion-3.5-medium/text_encoder_2/config.json (OpenCLIP bigG/14 text, with "
                      "projection)",
    "text_encoder_3": "T5-XXL encoder: left out (text_encoder_3=None: diffusers feeds zeros of its 256 x 4096 "
                      "shape, so the transformer's cost is unchanged; the T5 encoder itself is not measured)",
    "scheduler": "stabilityai/stable-diffusion-3.5-medium/scheduler/scheduler_config.json (FlowMatchEulerDiscrete, "
                 "shift 3)",
}
SD35M_TRANSFORMER = dict(
    patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD3_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
SD3_CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
)
SD3_CLIP_G = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=1280,
)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

# --- reward models: registry specs with real shapes and seeded random weights ---------------
REWARD_SPECS = {
    "clip-b32": "clip:ViT-B-32/random",  # open_clip ViT-B-32 config (OpenAI CLIP ViT-B/32), the paper's CLIP
    # open_clip ViT-H-14 config = laion/CLIP-ViT-H-14-laion2B-s32B-b79K, PickScore's backbone
    "pickscore-h14": "clip:ViT-H-14/random",
    "imagereward": "imagereward:random",  # THUDM/ImageReward med_config.json (BLIP ViT-L/16 + BERT-base cross-encoder)
}


@dataclass(frozen=True)
class Architecture:
    """One benchmarkable architecture: a pipeline (``kind`` 'sd') or a reward model ('reward')."""

    name: str
    kind: str
    pixel_multiple: int = 1  # resolutions must be a multiple of this (VAE factor x patch size); 1 = fixed input size
    default_resolution: int | None = None
    description: str = ""


ARCHITECTURES = {
    "sd21": Architecture(
        "sd21", "sd", 8, 512, "Stable Diffusion 2.1: UNet 865 M, VAE kl-f8, OpenCLIP-H text (512 or 768 px)"
    ),
    "sd35m": Architecture(
        "sd35m", "sd", 16, 512, "Stable Diffusion 3.5 Medium: MMDiT-X 2.24 B, 16-channel VAE, CLIP-L + bigG"
    ),
    "clip-b32": Architecture("clip-b32", "reward", description="CLIP ViT-B/32 (open_clip), 224 px"),
    "pickscore-h14": Architecture(
        "pickscore-h14", "reward", description="PickScore's CLIP ViT-H/14 (open_clip), 224 px"
    ),
    "imagereward": Architecture(
        "imagereward", "reward", description="ImageReward's BLIP (ViT-L/16 + BERT-base), 224 px"
    ),
}


class ArchitectureError(TnRayError, ValueError):
    """An unknown architecture name, or a resolution the model cannot take."""


def check_architecture(name: str, resolution: int | None = None) -> Architecture:
    """The architecture ``name``; ``resolution`` (pixels) checked against its VAE/patch factor."""
    if name not in ARCHITECTURES:
        raise ArchitectureError(f"unknown architecture '{name}'; known: {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[name]
    if resolution is not None and arch.kind == "sd":
        if resolution < arch.pixel_multiple * 4 or resolution % arch.pixel_multiple:
            raise ArchitectureError(
                f"resolution {resolution} px: {name} takes multiples of {arch.pixel_multiple} px "
                f"(VAE factor 8{' x patch size 2' if arch.pixel_multiple == 16 else ''}), "
                f"at least {arch.pixel_multiple * 4}"
            )
    return arch


# --- building with random weights ------------------------------------------------------------
@contextlib.contextmanager
def _fast_build(dtype):
    """Construction without weight initialization, parameters created in ``dtype``."""
    import torch
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            yield
    finally:
        torch.set_default_dtype(previous)


def fill_random(module, seed: int = 0):
    """Every parameter from one seeded generator: matrices/convolutions ~ N(0, 1/fan_in),
    one-dimensional weights 1, biases 0 (see the module docstring). Returns ``module``."""
    import torch

    gen = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.normal_(0.0, fan_in**-0.5, generator=gen)
            elif name.endswith("bias") or p.ndim == 0:
                p.zero_()
            else:
                p.fill_(1.0)
    return module


def _build(cls, dtype, seed: int, *args, **kwargs):
    with _fast_build(dtype):
        module = cls(*args, **kwargs)
    return fill_random(module, seed).to(dtype)


def _tokenizer():
    from transformers import CLIPTokenizer

    from tn_ray.rewards.bpe import clip_vocab_and_merges

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def sd21_pipeline(resolution: int = 512, dtype=None, device: str = "cpu", seed: int = 0):
    """A diffusers StableDiffusionPipeline of SD 2.1's shapes at ``resolution`` px: 768 takes the
    768 model's config (v-prediction, attention upcast), any other the -base config with the UNet's
    sample_size = resolution / 8 (the pipeline's default size)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    check_architecture("sd21", resolution)
    dtype = dtype or torch.float32
    v768 = resolution == 768
    unet = _build(UNet2DConditionModel, dtype, seed, sample_size=resolution // 8, upcast_attention=v768, **SD21_UNET)
    vae = _build(AutoencoderKL, dtype, seed + 1, sample_size=resolution, **SD_VAE)
    text = _build(
        CLIPTextModel,
        dtype,
        seed + 2,
        CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **SD21_TEXT),
    )
    scheduler = DDIMScheduler(prediction_type="v_prediction" if v768 else "epsilon", **SD21_SCHEDULER)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd35m_transformer(resolution: int = 512, dtype=None, device: str = "cpu", seed: int = 0):
    """SD 3.5 Medium's SD3Transformer2DModel (sample_size = resolution / 8)."""
    import torch
    from diffusers import SD3Transformer2DModel

    check_architecture("sd35m", resolution)
    return _build(
        SD3Transformer2DModel, dtype or torch.float32, seed, sample_size=resolution // 8, **SD35M_TRANSFORMER
    ).to(device)


def sd35m_pipeline(resolution: int = 512, dtype=None, device: str = "cpu", seed: int = 0):
    """A diffusers StableDiffusion3Pipeline of SD 3.5 Medium's shapes, T5 left out (see SD35M_SOURCE)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    dtype = dtype or torch.float32
    transformer = sd35m_transformer(resolution, dtype, "cpu", seed)
    vae = _build(AutoencoderKL, dtype, seed + 1, sample_size=resolution, **SD3_VAE)
    ids = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    clip_l = _build(CLIPTextModelWithProjection, dtype, seed + 2, CLIPTextConfig(**ids, **SD3_CLIP_L))
    clip_g = _build(CLIPTextModelWithProjection, dtype, seed + 3, CLIPTextConfig(**ids, **SD3_CLIP_G))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=_tokenizer(),
        text_encoder_2=clip_g,
        tokenizer_2=_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())
