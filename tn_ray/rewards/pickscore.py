"""PickScore (a CLIP-H fine-tuned on Pick-a-Pic) through transformers.

Reward = logit_scale * cosine(image, text), exactly as the PickScore authors compute it.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from tn_ray.rewards.base import ModelLoadError, RewardModel, RewardSpec, check_tokenizer, seeded_init
from tn_ray.rewards.bpe import clip_vocab_and_merges

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _features(out) -> torch.Tensor:
    """transformers 5 returns an output object (``.pooler_output``), 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def tiny_clip_model_and_processor():
    """A transformers CLIPModel from a small config (random weights) and a processor
    whose tokenizer is OpenAI CLIP's real BPE (from the file open_clip ships)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=32,
    )
    with seeded_init():
        model = CLIPModel(config)
    vocab, merges = clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


class PickScoreReward(RewardModel):
    name = "pickscore"

    def __init__(self, spec: RewardSpec, device: str | None = None, text_batch_size: int = 64):
        super().__init__(spec, device, text_batch_size)
        from transformers import AutoProcessor, CLIPModel

        if spec.is_tiny:
            model, processor = tiny_clip_model_and_processor()
        else:
            model_id = spec.source or DEFAULT_MODEL
            local = Path(model_id)
            has_proc = local.is_dir() and any((local / f).exists() for f in ("tokenizer.json", "vocab.json"))
            proc_id = model_id if has_proc else DEFAULT_PROCESSOR
            try:
                model = CLIPModel.from_pretrained(model_id, dtype=self.dtype)
                processor = AutoProcessor.from_pretrained(proc_id)
            except Exception as err:
                raise ModelLoadError(
                    f"could not load PickScore model '{model_id}' / processor '{proc_id}': "
                    f"{type(err).__name__}: {err}. Offline, pass a local directory holding the "
                    "model and its processor files: --models pickscore:/path/to/PickScore_v1"
                ) from err
            check_tokenizer(processor.tokenizer, proc_id)
        self.model = model.eval().to(self.device, self.dtype)
        self.processor = processor

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        feats = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        return F.normalize(feats.float(), dim=-1)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.processor(text=list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        feats = _features(self.model.get_text_features(
            input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)))
        return F.normalize(feats.float(), dim=-1)

    def score(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        scale = self.model.logit_scale.exp().float()
        return (scale * image_features @ text_features.T).cpu()
