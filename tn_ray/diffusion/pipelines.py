"""Text-to-image pipelines (diffusers): the paper's Stable Diffusion v2.1, a local copy, ``tiny`` or ``tiny-sd3``.

``tiny`` is a real :class:`diffusers.StableDiffusionPipeline` whose UNet, VAE, CLIP text
encoder and scheduler are built from small configs with random weights (seeded, so every
process builds the same one), with the real CLIP BPE tokenizer built offline. It runs the
whole denoising loop in milliseconds per 32 px image on a CPU; its images are noise, but
every code path (classifier-free guidance, per-row generators, VAE decoding) is the real one.
``tiny-sd3`` is the same for flow matching: a real :class:`diffusers.StableDiffusion3Pipeline`
(SD3Transformer2DModel, FlowMatchEulerDiscreteScheduler with SD 3's shift 3, two CLIP text encoders
with projection; the T5 encoder left out, ``text_encoder_3=None``, as its tokenizer cannot be built
offline: diffusers then feeds zeros in its place). ``world`` and ``world-flow`` are the small
pipelines trained on the synthetic world (tn_ray/diffusion/world, docs/world.md): a StableDiffusionPipeline
and its flow-matching variant, a StableDiffusion3Pipeline (LoRA targets: ``SD3_LORA_TARGETS``, its
transformer being an SD3Transformer2DModel, patch size 1).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tn_ray.diffusion.world.package import WEIGHTS, WEIGHTS_FLOW, check_weights, load, revision
from tn_ray.errors import TnRayError
from tn_ray.provenance import hub_revision

DEFAULT_PIPELINE = "stabilityai/stable-diffusion-2-1"  # the paper's generator (-base for fine-tuning)
TINY = "tiny"
TINY_SD3 = "tiny-sd3"  # a tiny flow-matching (Stable Diffusion 3) pipeline, random weights
# LoRA targets of an SD3 transformer: the joint attention's projections, image and text streams (diffusers'
# train_dreambooth_lora_sd3.py and flow_grpo's train_sd3.py)
SD3_LORA_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                    "attn.to_out.0", "attn.to_q", "attn.to_v"]
# the tiny pipelines' VAE (tiny and tiny-sd3: 32 px images, 8 x 8 x 4 latents)
TINY_VAE = dict(sample_size=32, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=8)
WORLD = "world"  # the small Stable Diffusion trained on the synthetic world, shipped with the package
WORLD_FLOW = "world-flow"  # its flow-matching variant (StableDiffusion3Pipeline; LoRA targets: SD3_LORA_TARGETS)
# LoRA targets of the world UNet: every attention, feed-forward, conv and time projection of its blocks (0.93 M
# parameters at rank 16). Its attention sits at 8x8 and coarser only, and attention-only LoRA (Stable Diffusion's
# default) barely moved it: RWR on the exact judge, 200 steps, fresh-sample accuracy +0.07 (attention only, rank 8)
# vs +0.23 (these, rank 16) vs +0.25 (the full UNet). Measured 2026-12-06, docs/world.md ("Learning on the world").
WORLD_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                      "conv1", "conv2", "time_emb_proj"]
DTYPES = ("auto", "float16", "bfloat16", "float32")


class PipelineLoadError(TnRayError, ValueError):
    """A text-to-image pipeline (or its scheduler) cannot be loaded; the message says why and what to do."""


def resolve_dtype(name: str, device):
    """``auto``: float16 on GPU (as in the paper), float32 on CPU."""
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def check_scheduler(name: str | None) -> None:
    if name is None:
        return
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("_"))
        raise PipelineLoadError(f"unknown diffusers scheduler {name!r}; e.g. {', '.join(known[:8])}, ...")


def check_source(source: str, revision: str | None = None) -> None:
    """Fail fast (before any actor starts) when the weights (at ``revision``) cannot be found offline."""
    if source in (TINY, TINY_SD3):
        return
    if source in (WORLD, WORLD_FLOW):

        check_weights(WEIGHTS if source == WORLD else WEIGHTS_FLOW)
        return
    local = Path(source)
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise PipelineLoadError(f"pipeline folder {local} has no model_index.json (a diffusers pipeline folder is "
                                    "expected)")
        return
    if "/" not in source:
        raise PipelineLoadError(f"unknown pipeline {source!r}: use {TINY!r}, {WORLD!r}, a Hugging Face id "
                                "(owner/name, e.g. stabilityai/stable-diffusion-2-1) or a local diffusers folder "
                                f"({TINY_SD3!r}: the tiny flow-matching pipeline; {WORLD_FLOW!r}: the world's)")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(source, "model_index.json", revision=revision), str):
            at = f" at revision '{revision}'" if revision else ""
            raise PipelineLoadError(
                f"pipeline '{source}'{at} is not in the Hugging Face cache and HF_HUB_OFFLINE=1: download it once "
                f"with network access (huggingface-cli download {source}) or set generation.pipeline to a local "
                "diffusers folder; 'tiny' runs without weights")


def tiny_pipeline():
    """A StableDiffusionPipeline from small configs (random weights, seed 0); 32 x 32 px by default."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tn_ray.rewards.bpe import clip_vocab_and_merges

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(**TINY_VAE)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )
    vocab, merges = clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sd3_pipeline():
    """A StableDiffusion3Pipeline from small configs (random weights, seed 0), T5 left out; 32 x 32 px by default."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from tn_ray.rewards.bpe import clip_vocab_and_merges

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=49407))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=64,  # the two CLIPs' hidden states side by side (32 + 32), as T5's width in SD3
            caption_projection_dim=16,
            pooled_projection_dim=64,  # the two CLIPs' pooled projections (32 + 32)
            pos_embed_max_size=16,
        )
        vae = AutoencoderKL(
            **TINY_VAE,
            scaling_factor=1.5305,  # SD 3's, with its shift: the decoding path is SD 3's
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        text_encoder, text_encoder_2 = clip(), clip()
    vocab, merges = clip_vocab_and_merges()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77),
        text_encoder_2=text_encoder_2,
        tokenizer_2=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def load_pipeline(
    source: str = DEFAULT_PIPELINE,
    scheduler: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    revision: str | None = None,
):
    """The pipeline on its device (the GPU Ray assigned, else CPU), eval mode, no progress bars;
    ``revision`` (a hub commit, branch or tag; None = the default branch) pins hub weights."""
    import diffusers

    from tn_ray.rewards.base import pick_device

    dev = pick_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if source == TINY:
        pipe = tiny_pipeline()
    elif source == TINY_SD3:
        pipe = tiny_sd3_pipeline()
    elif source in (WORLD, WORLD_FLOW):

        pipe = load(WEIGHTS if source == WORLD else WEIGHTS_FLOW)
    else:
        check_source(source, revision)
        try:
            pipe = diffusers.AutoPipelineForText2Image.from_pretrained(
                source, torch_dtype=torch_dtype, revision=revision
            )
        except Exception as err:
            raise PipelineLoadError(
                f"could not load text-to-image pipeline '{source}': {type(err).__name__}: {err}"
            ) from err
    if scheduler is not None:
        check_scheduler(scheduler)
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    if pipe.dtype != torch_dtype:  # `tiny`, `tiny-sd3` (built in float32): hub/local/world weights load in torch_dtype
        pipe = pipe.to(dev, torch_dtype)
    else:
        pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_revision(source: str, requested: str | None = None) -> str:
    """Revision of a diffusers pipeline source: 'random-init' (tiny), 'local' (a folder), else the hub commit."""

    if source in (TINY, TINY_SD3):
        return "random-init"
    if source in (WORLD, WORLD_FLOW):

        return revision(WEIGHTS if source == WORLD else WEIGHTS_FLOW)
    if Path(source).expanduser().exists():
        return "local"
    return hub_revision(source, "model_index.json", requested)


def pipeline_revisions(pipelines: Iterable[tuple[str, str | None]]) -> dict[str, str]:
    """``{"pipeline:<source>": revision}`` of (source, requested revision) pairs, for
    :func:`tn_ray.provenance.record`."""
    return {f"pipeline:{source}": pipeline_revision(source, rev) for source, rev in pipelines}
