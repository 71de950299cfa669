"""The T5 encoder's zero tokens as one token counted many times in SD 3's joint attention.

With the T5 encoder left out (``text_encoder_3=None``: ``tiny-sd3``, ``world-flow``), diffusers'
:class:`~diffusers.StableDiffusion3Pipeline` appends ``max_sequence_length`` (256) zero tokens to the CLIP
tokens, and every joint-attention layer of the transformer attends over them. Context tokens carry no
position and every per-token map of a block (the context embedder, the adaptive norms, the projections,
the feed-forward) sends identical inputs to identical outputs, so the 256 tokens stay identical through
every block; attending to n copies of one key/value is attending to it once with its weight times n,
i.e. with log n added to its logit. One zero token under :class:`NullTokensAttnProcessor` therefore gives
the transformer's output on the 256 (the same function, up to float rounding) at a fraction of the cost.

Used by the world generator's flow trainer (:mod:`tn_ray.diffusion.world.train`) and by tn_ray's flow
sampling and log-prob recomputation (:mod:`tn_ray.diffusion.flow_sampling`), which swaps the processor in
for the forwards on such embeddings only (:func:`null_token_attention`): the pipeline's own ``__call__`` and
pipelines with a T5 encoder keep diffusers' processor. The processor has no parameters: state dicts, LoRA
layers and checkpoints are the same with it or without it.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

# zeros in the T5 encoder's place: diffusers' StableDiffusion3Pipeline and tn_ray's flow sampling feed this many
# (max_sequence_length's default) when text_encoder_3 is None
T5_TOKENS = 256


class NullTokensAttnProcessor:
    """SD 3's joint attention (diffusers' ``JointAttnProcessor2_0``) for a context whose last token stands for
    ``copies`` identical tokens: that key's logit gets + log(copies), so attention is what it is over the copies.
    Without a context (SD 3.5's image-only second attention) it is diffusers' processor."""

    def __init__(self, copies: int):
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        self.copies = copies
        self.log_copies = math.log(copies)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None:
            from diffusers.models.attention_processor import JointAttnProcessor2_0

            return JointAttnProcessor2_0()(attn, hidden_states, None, attention_mask, *args, **kwargs)
        b, n = hidden_states.shape[:2]

        def split(x, norm=None):
            x = x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return x if norm is None else norm(x)

        e = encoder_hidden_states
        q = torch.cat([split(attn.to_q(hidden_states), attn.norm_q), split(attn.add_q_proj(e), attn.norm_added_q)], 2)
        k = torch.cat([split(attn.to_k(hidden_states), attn.norm_k), split(attn.add_k_proj(e), attn.norm_added_k)], 2)
        v = torch.cat([split(attn.to_v(hidden_states)), split(attn.add_v_proj(e))], 2)
        # in q's dtype (what SDPA's fused kernels take): in bfloat16 log 256 = 5.545 is stored as 5.531
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_copies
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(1, 1, 1, -1), dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3]).to(q.dtype)
        image, context = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context


def null_copies(pipe, max_sequence_length: int = T5_TOKENS) -> int:
    """How many zero tokens one token stands for in ``pipe``'s prompt embeddings: ``max_sequence_length``
    without a T5 encoder, 1 (nothing to fold: T5's tokens differ) with one."""
    return max_sequence_length if getattr(pipe, "text_encoder_3", None) is None else 1


def unwrap(model):
    """The transformer inside a DDP (or other ``.module``) wrapper."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


@contextlib.contextmanager
def null_token_attention(transformer, copies: int):
    """Within this block ``transformer`` (an SD3Transformer2DModel, plain, LoRA-wrapped or in DDP) counts the last
    context token ``copies`` times; its own processors come back after it. ``copies`` 1: nothing changes."""
    if copies == 1:
        yield
        return
    model = unwrap(transformer)
    before = model.attn_processors
    model.set_attn_processor(NullTokensAttnProcessor(copies))
    try:
        yield
    finally:
        model.set_attn_processor(before)
