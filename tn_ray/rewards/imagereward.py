"""ImageReward-v1.0 (Xu et al., NeurIPS 2023) on transformers' BLIP classes.

Architecture (as the official ``image-reward`` package): a BLIP ViT-L/16 image tower at
224 px; a BERT-base text encoder whose every layer cross-attends to all image tokens; the
[CLS] output goes through a 5-layer linear MLP head (no activations) and the published
normalization ``(r - 0.16717) / 1.03334``. Prompts are tokenized by bert-base-uncased
(plus BLIP's [DEC]/[ENC] tokens) and truncated to 35 tokens, as the official model does.

Here the image tower is ``BlipVisionModel`` and the text side ``BlipTextModel`` (both
ports of BLIP's code), loaded from the published ``ImageReward.pt`` through
:func:`convert_official_state_dict`. ``encode_images`` runs the image tower once per image;
``encode_texts`` only tokenizes; ``score`` projects each image's tokens into the
cross-attention keys/values of every text layer once per image, then runs the text side once
per (text, image) pair, in batches of ``pair_batch_size`` pairs cut to their longest prompt.

Sources (``imagereward[:SOURCE]``): none = ``THUDM/ImageReward`` from the hub cache; a
directory holding ``ImageReward.pt`` (optionally ``med_config.json`` and a BERT
``vocab.txt``); a path to the ``.pt`` file; another hub repo id; ``tiny`` = the same classes
with a small config and random weights (head re-initialised so scores depend on the image);
``random`` = the real shapes with seeded random weights (benchmarks).
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tn_ray.rewards.base import ModelLoadError, RewardModel, RewardSpec, check_tokenizer, seeded_init
from tn_ray.rewards.cross import TokenBatch, pad_tokens, score_pairs
from tn_ray.rewards.wordpiece import bert_tokenizer
from tn_ray.storage import read_json

log = logging.getLogger(__name__)

DEFAULT_REPO = "THUDM/ImageReward"
CHECKPOINT_NAME = "ImageReward.pt"
MED_CONFIG = Path(__file__).parent / "configs" / "imagereward-med-config.json"  # the published med_config.json
PUBLISHED_MEAN = 0.16717362830052426
PUBLISHED_STD = 1.0333394966054072
MAX_TEXT_TOKENS = 35  # the official tokenizer call: padding='max_length', truncation=True, max_length=35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class MLPHead(nn.Module):
    """The official head: Linear(d,1024) Dropout Linear(1024,128) Dropout Linear(128,64)
    Dropout Linear(64,16) Linear(16,1) (the ReLUs are commented out upstream); same indices
    in ``layers`` as the official module so checkpoint keys map one to one."""

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def reinit(self, generator: torch.Generator | None = None) -> None:
        """Weights ~ N(0, 1/fan_in), biases 0: a random head whose output varies with its
        input (the official init, std 1/(d+1) through five layers, makes it ~constant)."""
        with torch.no_grad():
            for layer in self.layers:
                if isinstance(layer, nn.Linear):
                    layer.weight.normal_(0.0, layer.in_features ** -0.5, generator=generator)
                    layer.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageRewardNet(nn.Module):
    """Image tower + cross-attending text encoder + MLP head + normalization."""

    def __init__(self, vision_config, text_config, mean: float = PUBLISHED_MEAN, std: float = PUBLISHED_STD):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = MLPHead(text_config.hidden_size)
        self.mean, self.std = float(mean), float(std)

    @property
    def image_size(self) -> int:
        return int(self.vision.config.image_size)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """All image tokens after the final LayerNorm: (n, 1 + patches, vision width)."""
        return self.vision(pixel_values=pixel_values).last_hidden_state

    def rewards(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        """Normalized rewards (n,) of n (prompt, image) pairs, row i = pair i."""
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        )
        return self._head(out.last_hidden_state[:, 0, :])

    def _head(self, cls: torch.Tensor) -> torch.Tensor:
        r = self.mlp(cls.to(self.mlp.layers[0].weight.dtype)).float().squeeze(-1)
        return (r - self.mean) / self.std

    # --- the same computation with the image side of cross-attention done once per image ---
    def cross_kv(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per text layer, the cross-attention keys and values of the image tokens, each
        (n_images, heads, tokens, head size). They depend on the image only, and projecting
        197 image tokens in 12 layers costs more than the whole text side of one pair."""
        n, length = image_embeds.shape[:2]
        kv = []
        for layer in self.text.encoder.layer:
            att = layer.crossattention.self
            shape = (n, length, att.num_attention_heads, att.attention_head_size)
            kv.append(
                (att.key(image_embeds).view(shape).transpose(1, 2), att.value(image_embeds).view(shape).transpose(1, 2))
            )
        return kv

    def rewards_from_kv(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        kv: list[tuple[torch.Tensor, torch.Tensor]],
        image_index: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`rewards` of pairs (text i, image ``image_index[i]``) from :meth:`cross_kv`:
        BlipTextModel's layers run module by module, except that cross-attention takes the
        precomputed keys/values (no mask: every image token is attended, as upstream)."""
        hidden = self.text.embeddings(input_ids=input_ids)
        mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        b, length = input_ids.shape
        for layer, (keys, values) in zip(self.text.encoder.layer, kv):
            attended = layer.attention(hidden, attention_mask=mask)[0]
            att = layer.crossattention.self
            q = att.query(attended).view(b, length, att.num_attention_heads, att.attention_head_size).transpose(1, 2)
            ctx = F.scaled_dot_product_attention(q, keys[image_index], values[image_index])
            attended = layer.crossattention.output(ctx.transpose(1, 2).reshape(b, length, -1), attended)
            hidden = layer.feed_forward_chunk(attended)
        return self._head(hidden[:, 0, :])


# ------------------------------------------------------------------ configs
def vision_config(
    width: int = 1024,
    depth: int = 24,
    image_size: int = 224,
    patch_size: int = 16,
    heads: int | None = None,
    mlp_ratio: float = 4.0,
):
    """BLIP ViT as ``create_vit`` builds it (ViT-L/16 at 224 px by default): LayerNorm eps
    1e-6, exact GELU, qkv bias."""
    from transformers import BlipVisionConfig

    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=int(width * mlp_ratio),
        num_hidden_layers=depth,
        num_attention_heads=heads or max(1, width // 64),
        image_size=image_size,
        patch_size=patch_size,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        attention_dropout=0.0,
        initializer_range=0.02,
    )


def text_config(med: dict[str, Any], encoder_width: int):
    """The BERT of ``med_config.json`` as a ``BlipTextConfig`` (cross-attention in every
    layer to ``encoder_width``-dim image tokens; dropout off: inference only)."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        encoder_hidden_size=encoder_width,
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=med.get("pad_token_id", 0),
        initializer_range=med.get("initializer_range", 0.02),
        is_decoder=True,  # is_decoder: build cross-attention
    )


def published_med_config() -> dict[str, Any]:
    return json.loads(MED_CONFIG.read_text())


# ------------------------------------------------------------------ checkpoint conversion
_VISION_KEYS = [
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
]
_IGNORED = re.compile(r"^blip\.(vision_proj|text_proj)\.|^blip\.text_encoder\.embeddings\.position_ids$")


def convert_official_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keys of the official ``ImageReward.pt`` -> keys of :class:`ImageRewardNet`.

    Returns (converted state dict, keys deliberately dropped: the ITC projections that
    ImageReward never uses and a buffer). Raises ``ModelLoadError`` naming unknown keys.
    """
    out: dict[str, torch.Tensor] = {}
    dropped, unknown = [], []
    for key, value in state.items():
        if _IGNORED.search(key):
            dropped.append(key)
        elif key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder.") :]
            for pattern, target in _VISION_KEYS:
                if re.fullmatch(pattern, rest):
                    out["vision." + re.sub(pattern, target, rest)] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            out["text." + key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp.layers."):
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ModelLoadError(f"not an ImageReward checkpoint: {len(unknown)} unknown keys, e.g. {unknown[:5]}")
    return out, dropped


def vision_config_from_state(state: dict[str, torch.Tensor]):
    """The ViT's shape read off an official state dict (width, depth, patch, image size)."""
    try:
        width = state["blip.visual_encoder.cls_token"].shape[-1]
        patch = state["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
        positions = state["blip.visual_encoder.pos_embed"].shape[1] - 1
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blip\.visual_encoder\.blocks\.(\d+)\.", k)))
        mlp_ratio = state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0] / width
    except (KeyError, ValueError) as err:
        raise ModelLoadError(
            f"not an ImageReward checkpoint: no BLIP image tower ({type(err).__name__}: {err})"
        ) from err
    side = round(positions**0.5)
    return vision_config(width=width, depth=depth, image_size=side * patch, patch_size=patch, mlp_ratio=mlp_ratio)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) file
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def load_official_checkpoint(path: str | Path, med_config: str | Path | dict | None = None) -> ImageRewardNet:
    """An :class:`ImageRewardNet` holding the weights of an official ``ImageReward.pt``
    (every parameter must be present: nothing is left at random init)."""
    path = Path(path)

    med = (
        med_config
        if isinstance(med_config, dict)
        else read_json(Path(med_config or MED_CONFIG), "ImageReward med_config")
    )
    state = _read_state(path)
    vcfg = vision_config_from_state(state)
    converted, dropped = convert_official_state_dict(state)
    with _skip_init():
        net = ImageRewardNet(vcfg, text_config(med, vcfg.hidden_size))
    result = net.load_state_dict(converted, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"{path} does not match the ImageReward architecture of {med_config or MED_CONFIG}: "
            f"missing {missing[:5]} ({len(missing)}), unexpected {result.unexpected_keys[:5]} "
            f"({len(result.unexpected_keys)})"
        )
    log.debug("loaded %s (%d tensors; dropped %s)", path, len(converted), dropped)
    return net.eval()


def _skip_init():
    """transformers' context that builds modules without running their random init (the
    weights are loaded right after)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


# ------------------------------------------------------------------ tokenizer
def blip_tokenizer(base):
    """BLIP's ``init_tokenizer`` on a bert-base-uncased tokenizer: adds [DEC] (bos) and [ENC]."""
    base.add_special_tokens({"bos_token": "[DEC]"})
    base.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return base


def _tokenizer_for(folder: Path | None):
    from transformers import BertTokenizer

    if folder is not None and (folder / "vocab.txt").is_file():
        return blip_tokenizer(bert_tokenizer(folder / "vocab.txt"))
    try:
        tok = BertTokenizer.from_pretrained("bert-base-uncased")
        check_tokenizer(tok, "bert-base-uncased")  # offline, transformers may return a 5-entry stub
    except Exception as err:
        raise ModelLoadError(
            f"could not load the bert-base-uncased tokenizer ImageReward uses ({type(err).__name__}: {err}). "
            "Offline, put its vocab.txt next to ImageReward.pt and pass that folder: --models imagereward:/path/to/dir"
        ) from err
    return blip_tokenizer(tok)


# ------------------------------------------------------------------ the reward model
def tiny_parts(seed: int = 0) -> tuple[ImageRewardNet, Any]:
    """The same classes with a small config and seeded random weights: ViT of 2 layers of
    width 128 (2 heads of 64, as the real one's head size) on 32 px, BERT of 2 layers of 64."""

    tokenizer = blip_tokenizer(bert_tokenizer())
    med = {
        **published_med_config(),
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }
    with seeded_init(seed):
        net = ImageRewardNet(vision_config(width=128, depth=2, image_size=32, patch_size=8), text_config(med, 128))
    net.mlp.reinit(torch.Generator().manual_seed(seed))
    return net.eval(), tokenizer


def random_full_size_parts(seed: int = 0) -> tuple[ImageRewardNet, Any]:
    """ImageReward's real shapes (ViT-L/16 at 224, BERT-base with cross-attention) with
    seeded random weights (``imagereward:random``), for benchmarks."""

    tokenizer = blip_tokenizer(bert_tokenizer())
    with seeded_init(seed):
        net = ImageRewardNet(vision_config(), text_config(published_med_config(), 1024))
    net.mlp.reinit(torch.Generator().manual_seed(seed))
    return net.eval(), tokenizer


def resolve_source(source: str | None) -> tuple[Path, Path | None, Path | None]:
    """(checkpoint, med_config or None for the published one, folder with vocab.txt or None)."""
    if source and Path(source).expanduser().exists():
        p = Path(source).expanduser()
        if p.is_dir():
            ckpt = p / CHECKPOINT_NAME
            if not ckpt.is_file():
                raise ModelLoadError(f"ImageReward folder {p} has no {CHECKPOINT_NAME}")
            folder = p
        else:
            ckpt, folder = p, p.parent
        med = folder / "med_config.json"
        return ckpt, (med if med.is_file() else None), folder
    repo = source or DEFAULT_REPO
    try:
        from huggingface_hub import hf_hub_download

        ckpt = Path(hf_hub_download(repo, CHECKPOINT_NAME))
    except Exception as err:
        raise ModelLoadError(
            f"could not get {CHECKPOINT_NAME} of '{repo}': {type(err).__name__}: {err}. Offline, download it once "
            f"(huggingface-cli download {DEFAULT_REPO} {CHECKPOINT_NAME} med_config.json) or pass a local file or "
            "folder: --models imagereward:/path/to/ImageReward.pt"
        ) from err
    med = ckpt.parent / "med_config.json"
    return ckpt, (med if med.is_file() else None), None


class ImageRewardReward(RewardModel):
    name = "imagereward"

    def __init__(
        self, spec: RewardSpec, device: str | None = None, text_batch_size: int = 64, pair_batch_size: int = 64
    ):
        super().__init__(spec, device, text_batch_size)
        from torchvision import transforms

        # float32 on every device, as the official model (which never casts): in bf16 the
        # rewards move by ~1e-2, as much as the gaps between close images. Cheap enough:
        # one ViT-L pass per image plus ~2 GFLOP per (prompt, image) pair.
        self.dtype = torch.float32

        if spec.is_tiny:
            net, tokenizer = tiny_parts()
        elif spec.source == "random":
            net, tokenizer = random_full_size_parts()
        else:
            ckpt, med, folder = resolve_source(spec.source)
            tokenizer = _tokenizer_for(folder)
            net = load_official_checkpoint(ckpt, med)
        self.net = net.eval().to(self.device, self.dtype)
        self.tokenizer = tokenizer
        self.pair_batch_size = pair_batch_size
        self.pairs_scored = 0
        n = self.net.image_size
        self.preprocess = transforms.Compose(
            [
                transforms.Resize(n, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(n),
                transforms.ToTensor(),
                transforms.Normalize(CLIP_MEAN, CLIP_STD),
            ]
        )

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device, self.dtype)
        return self.net.encode_images(pixels)

    def encode_texts(self, texts: Sequence[str]) -> list[torch.Tensor]:
        ids = self.tokenizer(list(texts), truncation=True, max_length=MAX_TEXT_TOKENS)["input_ids"]
        return [torch.tensor(x, dtype=torch.long) for x in ids]

    def join_text_features(self, items: list[torch.Tensor]) -> TokenBatch:
        return pad_tokens(items, self.tokenizer.pad_token_id)

    def score(self, image_features: torch.Tensor, text_features: TokenBatch) -> torch.Tensor:
        def pair_rewards(kv, image_index, input_ids, mask):
            return self.net.rewards_from_kv(input_ids, mask, kv, image_index)

        out = score_pairs(
            pair_rewards, image_features, text_features, self.pair_batch_size, self.device, prepare=self.net.cross_kv
        )
        self.pairs_scored += out.numel()
        return out
