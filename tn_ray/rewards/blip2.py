"""BLIP-2 (Li et al., 2023) image-text rewards through transformers' ``Blip2ForImageTextRetrieval``.

``blip2``: the pretrained Q-Former's image-text contrastive (ITC) similarity, as the TextNorm
paper used BLIP-2: the image's 32 query embeddings and the prompt's [CLS] embedding are
projected and L2-normalized, and the reward is the highest cosine over the queries (LAVIS
``match_head='itc'``; transformers' ``use_image_text_matching_head=False``). A dual encoder:
``encode_images`` runs ViT-g + Q-Former once per image, ``encode_texts`` the Q-Former text
side once per prompt, ``score`` is one matrix product.

``blip2-itm``: the same weights' image-text matching head, a cross-encoder: ``encode_images``
keeps the ViT tokens, ``encode_texts`` tokenizes, and ``score`` runs queries + prompt through
the Q-Former per (image, text) pair in batches. The reward is the head's match log-odds
``logit(match) - logit(no match)`` (averaged over queries as transformers does), i.e. the
logit of LAVIS's ITM probability: unbounded, so TextNorm's softmax can use it directly.

Sources: none = ``Salesforce/blip2-itm-vit-g`` (hub cache), a hub id or a local folder;
``tiny`` = the same classes, small config, random weights. Prompts are truncated to 32
tokens (LAVIS ``max_txt_len``).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from tn_ray.rewards.base import ModelLoadError, RewardModel, RewardSpec, check_tokenizer, seeded_init
from tn_ray.rewards.cross import TokenBatch, pad_tokens, score_pairs
from tn_ray.rewards.wordpiece import bert_tokenizer

DEFAULT_MODEL = "Salesforce/blip2-itm-vit-g"
MAX_TEXT_TOKENS = 32


def tiny_parts(seed: int = 0) -> tuple[Any, Any, Any]:
    """(model, image processor, tokenizer): small config (32 px, 2 layers of 64, 4 queries),
    random weights, BERT-style tokenizer built offline."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, BlipImageProcessor

    tokenizer = bert_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # as the released BLIP-2 tokenizer
    config = Blip2Config(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, initializer_range=0.02),
        qformer_config=dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, encoder_hidden_size=64, cross_attention_frequency=1,
                            max_position_embeddings=64, use_qformer_text_input=True),
        num_query_tokens=4, image_text_hidden_size=32,
    )
    with seeded_init(seed):
        model = Blip2ForImageTextRetrieval(config)
    processor = BlipImageProcessor(size={"height": 32, "width": 32})
    return model.eval(), processor, tokenizer


def _load(source: str | None, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    from transformers import AutoImageProcessor, AutoTokenizer, Blip2ForImageTextRetrieval

    model_id = source or DEFAULT_MODEL
    try:
        model = Blip2ForImageTextRetrieval.from_pretrained(model_id, dtype=dtype)
        processor = AutoImageProcessor.from_pretrained(model_id)
        tokenizer = AutoTokenizer.from_pretrained(model_id)
    except Exception as err:
        where = "a local folder" if Path(model_id).exists() else f"'{model_id}'"
        raise ModelLoadError(
            f"could not load BLIP-2 from {where}: {type(err).__name__}: {err}. Offline, download it once "
            f"(huggingface-cli download {DEFAULT_MODEL}) or pass a local folder: --models "
            "blip2:/path/to/blip2-itm-vit-g"
        ) from err
    check_tokenizer(tokenizer, model_id)
    return model.eval(), processor, tokenizer


class Blip2Reward(RewardModel):
    """ITC: reward = max over query tokens of cosine(query embedding, prompt embedding)."""

    name = "blip2"
    use_itm_head = False

    def __init__(self, spec: RewardSpec, device: str | None = None, text_batch_size: int = 64,
                 pair_batch_size: int = 64):
        super().__init__(spec, device, text_batch_size)
        model, processor, tokenizer = tiny_parts() if spec.is_tiny else _load(spec.source, self.dtype)
        self.model = model.to(self.device)
        self.processor = processor
        self.tokenizer = tokenizer
        self.pair_batch_size = pair_batch_size
        self.pairs_scored = 0

    # --- shared pieces (each mirrors Blip2ForImageTextRetrieval.forward) --------------
    def _vision_tokens(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        vision = self.model.vision_model
        return vision(pixel_values=pixels.to(self.device, vision.dtype)).last_hidden_state

    def _tokens(self, texts: Sequence[str]) -> list[torch.Tensor]:
        ids = self.tokenizer(list(texts), truncation=True, max_length=MAX_TEXT_TOKENS)["input_ids"]
        return [torch.tensor(x, dtype=torch.long) for x in ids]

    # --- the three steps --------------------------------------------------------------
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(n, queries, dim) normalized projected query outputs."""
        m = self.model
        image_embeds = self._vision_tokens(images)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query_tokens = m.query_tokens.expand(image_embeds.shape[0], -1, -1)
        queries = m.qformer(query_embeds=query_tokens, encoder_hidden_states=image_embeds,
                            encoder_attention_mask=image_atts).last_hidden_state
        queries = queries.to(dtype=m.vision_projection.weight.dtype)
        return F.normalize(m.vision_projection(queries), dim=-1).float()

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, dim) normalized projected [CLS] outputs of the Q-Former's text side."""
        m = self.model
        tokens = pad_tokens(self._tokens(texts), self.tokenizer.pad_token_id)
        embeds = m.embeddings(input_ids=tokens.input_ids.to(self.device))
        out = m.qformer(query_embeds=embeds, query_length=0,
                        attention_mask=tokens.attention_mask.to(self.device)).last_hidden_state
        out = out.to(dtype=m.text_projection.weight.dtype)
        return F.normalize(m.text_projection(out[:, 0, :]), dim=-1).float()

    def score(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        sims = torch.einsum("iqd,td->iqt", image_features, text_features.to(image_features.device))
        return sims.max(dim=1).values.cpu()


class Blip2ItmReward(Blip2Reward):
    """ITM: reward = match log-odds of the image-text matching head, per (image, text) pair."""

    name = "blip2-itm"
    use_itm_head = True

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(n, 1 + patches, vision width) ViT tokens: the Q-Former cross-attends to them per pair."""
        return self._vision_tokens(images)

    def encode_texts(self, texts: Sequence[str]) -> list[torch.Tensor]:
        return self._tokens(texts)

    def join_text_features(self, items: list[torch.Tensor]) -> TokenBatch:
        return pad_tokens(items, self.tokenizer.pad_token_id)

    def _pair_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        m = self.model
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query_tokens = m.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_atts = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=query_tokens.device)
        embeds = m.embeddings(input_ids=input_ids, query_embeds=query_tokens)
        out = m.qformer(
            query_embeds=embeds,
            query_length=query_tokens.shape[1],
            attention_mask=torch.cat([query_atts, attention_mask], dim=1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        ).last_hidden_state
        out = out.to(dtype=m.itm_head.weight.dtype)
        return m.itm_head(out[:, : query_tokens.shape[1], :]).mean(dim=1).float()

    def score(self, image_features: torch.Tensor, text_features: TokenBatch) -> torch.Tensor:
        def pair_rewards(image_rows, image_index, input_ids, mask):
            logits = self._pair_logits(image_rows[image_index], input_ids, mask)
            return logits[:, 1] - logits[:, 0]

        out = score_pairs(pair_rewards, image_features, text_features, self.pair_batch_size, self.device)
        self.pairs_scored += out.numel()
        return out
