"""OpenAI CLIP through open_clip: reward = logit_scale * cosine(image, text) (100 x cos)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from tn_ray.rewards.base import ModelLoadError, RewardModel, RewardSpec, seeded_init

DEFAULT_ARCH, DEFAULT_PRETRAINED = "ViT-B-32", "openai"
TINY_ARCH = "tn-tiny-clip"  # tn_ray/rewards/configs/tn-tiny-clip.json, random weights


def _register_tiny_config() -> None:
    import open_clip

    if TINY_ARCH not in open_clip.list_models():
        open_clip.add_model_config(Path(__file__).parent / "configs" / f"{TINY_ARCH}.json")


def resolve(source: str | None) -> tuple[str, str | None]:
    """(open_clip architecture, pretrained tag/path/hf-hub id) for a spec's source.

    ``None`` -> ViT-B-32/openai; ``tiny`` -> random small config; ``ARCH/TAG`` (e.g.
    ``ViT-L-14/openai``; ``ARCH/random`` = that architecture with seeded random weights, for
    benchmarks); ``hf-hub:org/repo``; a local checkpoint file (ViT-B-32 shape) or
    ``ARCH=/path/to/checkpoint``.
    """
    if source is None:
        return DEFAULT_ARCH, DEFAULT_PRETRAINED
    if source == "tiny":
        return TINY_ARCH, None
    if source.startswith("hf-hub:"):
        return source, None
    if "=" in source:
        arch, path = source.split("=", 1)
        return arch, path
    if Path(source).exists():
        return DEFAULT_ARCH, source
    if "/" in source:
        arch, tag = source.split("/", 1)
        return arch, (None if tag == "random" else tag)
    return source, None


class ClipReward(RewardModel):
    name = "clip"

    def __init__(self, spec: RewardSpec, device: str | None = None, text_batch_size: int = 64):
        super().__init__(spec, device, text_batch_size)
        import open_clip

        _register_tiny_config()
        arch, pretrained = resolve(spec.source)
        try:
            with seeded_init():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    arch, pretrained=pretrained, device=self.device
                )
        except Exception as err:  # network, missing file, unknown arch
            raise ModelLoadError(
                f"could not load CLIP '{spec}' (open_clip arch={arch!r}, pretrained={pretrained!r}): "
                f"{type(err).__name__}: {err}. Offline, pass a local checkpoint: "
                "--models clip:ViT-B-32=/path/to/open_clip_pytorch_model.bin"
            ) from err
        if (
            pretrained is None
            and not spec.is_tiny
            and not (spec.source or "").endswith("/random")
            and not arch.startswith("hf-hub:")
        ):
            raise ModelLoadError(f"CLIP '{spec}': no pretrained weights named; use ARCH/TAG, ARCH/random or 'tiny'")
        self.model = model.eval().to(self.dtype)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device, self.dtype)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(encode_text_trimmed(self.model, tokens).float(), dim=-1)

    def score(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        scale = self.model.logit_scale.exp().float()
        return (scale * image_features @ text_features.T).cpu()


def encode_text_trimmed(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` on tokens cut after the longest sequence's end token.

    CLIP's text tower is causal and pools the end-of-text token, so positions after it
    never influence the result: cutting the 77-token padding to the batch's real length
    (typically 10-20 tokens) gives the same features several times faster. Falls back to
    the model's own ``encode_text`` for towers that are not the standard causal one.
    """
    if getattr(model, "text_pool_type", "argmax") != "argmax" or getattr(model, "attn_mask", None) is None:
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max().item()) + 1  # position of the last EOT + 1
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
