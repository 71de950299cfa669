"""The world generator's flow-matching variant: settings, the rectified-flow loss, resumable training of the
transformer on the shipped autoencoder and text encoder, the packaged StableDiffusion3Pipeline folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tn_ray.diffusion.world.settings import WorldGeneratorConfig

FLOW = {
    "threads": 1,
    "denoiser": "transformer",
    "parts_from": "world",  # the shipped autoencoder and text encoder (the settings' defaults describe them)
    "transformer": {"layers": 2, "heads": 2, "head_dim": 8},  # 2: the last block has no attn.to_add_out
    "train": {"objective": "flow", "steps": 4, "batch": 4, "warmup": 1, "checkpoint_every": 1},
    "eval_per_kind": 1,
    "eval_images": 1,
    "sampling": {"steps": 2},
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train": {"objective": "flow"}}, "train.objective 'flow' needs denoiser: transformer"),
        ({"parts_from": "world"}, "parts_from is for denoiser: transformer"),
        ({"denoiser": "transformer", "parts_from": "world"}, "denoiser 'transformer' needs train.objective: flow"),
        ({"denoiser": "transformer", "train": {"objective": "flow"}}, "denoiser 'transformer' needs parts_from"),
        ({**FLOW, "transformer": {"patch_size": 3}}, "16 px latent, which transformer.patch_size 3 does not divide"),
    ],
)
def test_settings_that_mix_the_denoisers_are_named_in_one_line(change, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        WorldGeneratorConfig(**change)
    assert len(err.value.errors()) == 1


def test_the_flow_loss_is_the_rectified_flow_mse_by_hand():
    """A transformer that outputs zeros: the loss is mean((noise - x0)^2) with the noise the generator draws
    first; the timesteps it was given are the scheduler's at u x 1000, u drawn next (logit-normal)."""
    import torch

    from tn_ray.diffusion.world import models
    from tn_ray.diffusion.world.train import flow_loss

    cfg = WorldGeneratorConfig(**{**FLOW, "train": {**FLOW["train"], "shift": 3.0}})
    scheduler = models.flow_scheduler(cfg)
    x0 = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 4, 2, 2) / 10
    seen = {}

    def zero(hidden_states, timestep, return_dict, **cond):
        seen["x_t"], seen["t"], seen["cond"] = hidden_states, timestep, cond
        return (torch.zeros_like(hidden_states),)

    loss = flow_loss(zero, scheduler, x0, {"encoder_hidden_states": None}, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(x0.shape, generator=g)
    u = torch.sigmoid(torch.normal(0.0, 1.0, size=(2,), generator=g))
    i = (u * 1000).long()
    sigma = (scheduler.timesteps[i] / 1000).view(2, 1, 1, 1)  # shifted: the scheduler's sigma = t / 1000
    assert torch.allclose(loss, ((noise - x0) ** 2).mean())
    assert torch.equal(seen["t"], scheduler.timesteps[i])
    assert torch.allclose(seen["x_t"], (1 - sigma) * x0 + sigma * noise)
    assert seen["cond"] == {"encoder_hidden_states": None}
    uniform = flow_loss(zero, scheduler, x0, {}, torch.Generator().manual_seed(5), density="uniform")
    assert torch.allclose(uniform, loss)  # the same noise is drawn first; zero output ignores the timestep


def test_the_world_text_encoder_reads_the_same_in_the_sd3_pipeline():
    """CLIPTextModelWithProjection from the shipped CLIPTextModel: pooled output and last hidden state equal, the
    penultimate state (what StableDiffusion3Pipeline reads) is the world encoder's last layer."""
    import torch
    from transformers import CLIPTextModel

    from tn_ray.diffusion.world import models, package
    from tn_ray.diffusion.world.tokenizer import world_tokenizer

    text = CLIPTextModel.from_pretrained(package.WEIGHTS, subfolder="text_encoder", dtype=torch.float32)
    clip = models.text_encoder_with_projection(text)
    tok = world_tokenizer()
    ids = tok(
        ["a photo of two red circles", ""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        a = text(ids, output_hidden_states=True)
        b = clip(ids, output_hidden_states=True)
    assert torch.allclose(b.text_embeds, a.pooler_output, atol=1e-6)
    assert torch.allclose(b.last_hidden_state, a.last_hidden_state, atol=1e-6)
    assert torch.allclose(b.hidden_states[-2], a.hidden_states[-1], atol=1e-6)


def test_flow_training_resumes_after_a_crash_to_the_same_weights(tmp_path):
    import json

    import torch

    from tn_ray.diffusion.world.train import Trainer

    cfg = WorldGeneratorConfig(**FLOW)
    whole = Trainer(cfg, tmp_path / "whole", progress=lambda s: None)
    assert whole.phase == "denoiser"  # no autoencoder phase: the parts are the shipped ones
    frozen = {k: v.clone() for k, v in whole.text.state_dict().items()}
    whole.run()
    lines = []
    crashed = Trainer(cfg, tmp_path / "crashed", progress=lambda s: None)
    crashed.run(stop_after=2)
    resumed = Trainer(cfg, tmp_path / "crashed", progress=lines.append)
    assert lines == [f"resumed {tmp_path / 'crashed' / 'state.pt'}: denoiser phase, step 2"]
    resumed.run()
    for (name, x), (_, y) in zip(whole.denoiser.state_dict().items(), resumed.denoiser.state_dict().items()):
        assert torch.equal(x, y), name
    assert whole.ema.state_dict()["shadow_params"][0].equal(resumed.ema.state_dict()["shadow_params"][0])
    assert all(torch.equal(frozen[k], v) for k, v in whole.text.state_dict().items())  # the text encoder is frozen
    log = [json.loads(s) for s in (tmp_path / "crashed" / "log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in log] == [("denoiser", i) for i in (1, 2, 3, 4)]
    assert all(r["loss"] > 0 for r in log)
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    processors = whole.pipeline().transformer.attn_processors.values()  # the shipped one: diffusers' own
    assert all(type(p) is JointAttnProcessor2_0 for p in processors)


def test_the_flow_pipeline_is_written_and_loads_with_plain_diffusers(tmp_path):
    """build(): train, write the fp16 folder, evaluate it with the judge; plain StableDiffusion3Pipeline loads it
    and draws 32 px images; tn_ray's GRPO sampler runs on it and its LoRA targets (SD3_LORA_TARGETS) find the
    world transformer's modules."""
    import json

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from tn_ray.diffusion.pipelines import SD3_LORA_TARGETS
    from tn_ray.diffusion.world import package
    from tn_ray.diffusion.world.build import build
    from tn_ray.training.flow_policy import add_flow_lora

    cfg = WorldGeneratorConfig(**{**FLOW, "train": {**FLOW["train"], "steps": 2}})
    rec = build(cfg, tmp_path / "work", tmp_path / "out", progress=lambda s: None)
    assert set(rec["sha256"]) == {
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
    }
    assert rec["held_out_eval"]["accuracy"]["overall"]["n"] == 4
    assert len(rec["parts_revision"]) == 12
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    package.check_weights(tmp_path / "out")
    # T5 left out as diffusers documents it for SD 3 (the folder records it as absent)
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "out", text_encoder_3=None, tokenizer_3=None)
    assert type(pipe.transformer) is SD3Transformer2DModel
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and pipe.text_encoder_3 is None
    from safetensors import safe_open

    for name in rec["sha256"]:  # stored as fp16
        with safe_open(str(tmp_path / "out" / name), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}, name
    assert type(package.load(tmp_path / "out")) is StableDiffusion3Pipeline
    pipe = pipe.to(torch.float32)
    images = pipe(
        ["a photo of two red circles", "a photo of a green triangle"],
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert [im.size for im in images] == [(32, 32), (32, 32)]
    from tn_ray.diffusion.flow_sampling import decode_flow_images, sample_flow_chains

    chains = sample_flow_chains(  # GRPO's sampler: SDE steps with log-probs
        pipe,
        ["a photo of two red circles"] * 2,
        num_steps=2,
        guidance=3.0,
        noise_level=0.7,
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
    )
    assert chains.latents.shape == (2, 3, 4, 16, 16) and chains.log_probs.shape == (2, 2)
    assert decode_flow_images(pipe, chains.latents[:, -1]).shape == (2, 32, 32, 3)
    add_flow_lora(pipe, rank=2)
    adapted = {name for name, m in pipe.transformer.named_modules() if hasattr(m, "lora_A")}
    assert {t for t in SD3_LORA_TARGETS if any(n.endswith(t) for n in adapted)} == set(SD3_LORA_TARGETS)


def test_the_shipped_flow_pipeline_loads_with_plain_diffusers_and_matches_its_record():
    """weights_flow/ (committed): its files' sha256 as recorded, at most 15 MB of fp16 safetensors, loadable by
    plain diffusers without T5, a flow pipeline for `tn-ray grpo`, trained under sweeps/world_generator_flow.yaml
    exactly, with its held-out evaluation recorded per kind."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from safetensors import safe_open

    from tn_ray.config import load_config
    from tn_ray.diffusion.pipelines import check_source, load_pipeline, pipeline_revision
    from tn_ray.diffusion.world import package
    from tn_ray.training.policy import check_policy_kind, is_flow_source

    assert is_flow_source("world-flow")
    check_policy_kind("world-flow", flow=True, method="grpo")
    check_source("world-flow")
    package.check_weights(package.WEIGHTS_FLOW)
    rec = package.record(package.WEIGHTS_FLOW)
    assert sum((package.WEIGHTS_FLOW / name).stat().st_size for name in rec["sha256"]) <= 15 * 2**20
    for name in rec["sha256"]:
        with safe_open(str(package.WEIGHTS_FLOW / name), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}, name
    pipe = StableDiffusion3Pipeline.from_pretrained(package.WEIGHTS_FLOW, text_encoder_3=None, tokenizer_3=None)
    assert type(pipe.transformer) is SD3Transformer2DModel and type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    assert pipe.transformer.config.patch_size == 1
    ours = load_pipeline("world-flow", device="cpu")
    assert ours.transformer.dtype == torch.float32
    assert pipeline_revision("world-flow") == package.revision(package.WEIGHTS_FLOW)
    assert pipeline_revision("world-flow").startswith("world-flow@")
    shipped = load_config(Path(__file__).parents[1] / "sweeps/world_generator_flow.yaml", WorldGeneratorConfig)
    assert WorldGeneratorConfig(**rec["settings"]) == shipped
    accuracy = rec["held_out_eval"]["accuracy"]
    assert set(accuracy) == {"overall", "counting", "colours", "composition", "spatial"}
    assert accuracy["overall"]["n"] == 384


def test_the_flow_yaml_validates():
    from tn_ray.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "sweeps/world_generator_flow.yaml", WorldGeneratorConfig)
    assert (cfg.denoiser, cfg.train.objective, cfg.parts_from) == ("transformer", "flow", "world")
    assert cfg.train.stop_at * cfg.train.batch == 1800 * 64  # the samples the shipped UNet saw


def test_one_null_token_counted_256_times_is_the_pipelines_256_zero_tokens():
    """Training feeds 1 zero token in T5's place and counts it 256 times in attention; sampling (plain diffusers)
    feeds 256 zeros through diffusers' own processor: the same transformer output."""
    import torch
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from tn_ray.diffusion.null_tokens import T5_TOKENS, NullTokensAttnProcessor
    from tn_ray.diffusion.world import models

    cfg = WorldGeneratorConfig(**{**FLOW, "transformer": {"layers": 3, "heads": 2, "head_dim": 8}})
    torch.manual_seed(0)
    net = models.transformer(cfg)
    for p in net.parameters():  # every weight non-zero (the output layers start at zero)
        p.data.normal_(0, 0.3)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([300.0, 900.0])
    clip, pooled = torch.randn(2, 20, 256), torch.randn(2, 256)
    zeros = torch.zeros(2, T5_TOKENS, 256)
    with torch.no_grad():
        assert all(type(p) is JointAttnProcessor2_0 for p in net.attn_processors.values())
        full = net(
            hidden_states=x, timestep=t, encoder_hidden_states=torch.cat([clip, zeros], 1), pooled_projections=pooled
        ).sample
        net.set_attn_processor(NullTokensAttnProcessor(T5_TOKENS))
        one = net(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=torch.cat([clip, zeros[:, :1]], 1),
            pooled_projections=pooled,
        ).sample
        net.set_attn_processor(NullTokensAttnProcessor(1))
        unweighted = net(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=torch.cat([clip, zeros[:, :1]], 1),
            pooled_projections=pooled,
        ).sample
    scale = full.abs().max()
    assert (one - full).abs().max() < 1e-5 * scale  # float rounding (outputs of about 6 here)
    assert (unweighted - full).abs().max() > 1e-2 * scale  # the count matters
