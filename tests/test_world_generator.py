"""The world generator: its tokenizer, settings, resumable training, the shipped folder."""
from __future__ import annotations

import json

import pytest

from tn_ray.diffusion.world.settings import WorldGeneratorConfig

SMALL = {
    "threads": 1,
    "autoencoder": {"channels": [16, 32], "steps": 3, "batch": 4},
    "text": {"hidden": 32, "layers": 1, "heads": 2},
    "unet": {"channels": [32, 32], "attention_from": 1, "heads": 2},
    "train": {"steps": 4, "batch": 4, "warmup": 1, "checkpoint_every": 1},
    "eval_per_kind": 1,
    "eval_images": 1,
    "sampling": {"steps": 2},
}


def test_every_word_of_the_grammar_is_one_token_as_clip_tokenizes_it():
    from open_clip.tokenizer import SimpleTokenizer

    from tn_ray.data.world.grammar import prompt_list, vocabulary
    from tn_ray.diffusion.world.tokenizer import MAX_LENGTH, world_tokenizer

    tok = world_tokenizer()
    assert len(tok) < 150
    clip = SimpleTokenizer()  # open_clip's own BPE: the independent reference
    for text in [p.text for p in prompt_list(6, seed=3)] + vocabulary():
        ours = tok.convert_ids_to_tokens(tok(text).input_ids)
        assert ours[1:-1] == [clip.decoder[i] for i in clip.encode(text)]
        assert len(ours) <= MAX_LENGTH


@pytest.mark.parametrize(
    "change, message",
    [
        ({"text": {"hidden": 30, "heads": 4}}, "text.heads (4) must divide text.hidden (30)"),
        ({"size": 36}, "size 36 px with 2 autoencoder blocks gives a 18 px latent"),
        ({"unet": {"attention_from": 3}}, "unet.attention_from (3) must be below the number of UNet blocks (3)"),
    ],
)
def test_settings_that_cannot_build_a_model_are_named(change, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        WorldGeneratorConfig(**change)


def shipped_settings() -> WorldGeneratorConfig:
    from pathlib import Path

    from tn_ray.config import load_config

    return load_config(Path("sweeps/world_generator.yaml"), WorldGeneratorConfig)


def test_the_shipped_yaml_is_the_settings_default_but_where_it_stops():
    assert shipped_settings().model_copy(update={"train": shipped_settings().train.model_copy(
        update={"stop_at": None})}) == WorldGeneratorConfig()


def test_training_resumes_after_a_crash_to_the_same_weights(tmp_path):
    import torch

    from tn_ray.diffusion.world.train import Trainer

    cfg = WorldGeneratorConfig(**SMALL)
    whole = Trainer(cfg, tmp_path / "whole", progress=lambda s: None)
    whole.run()
    lines = []
    crashed = Trainer(cfg, tmp_path / "crashed", progress=lambda s: None)
    crashed.run(stop_after=5)  # 3 autoencoder steps, then 2 of the denoiser's 4
    assert crashed.phase == "denoiser" and crashed.step == 2
    resumed = Trainer(cfg, tmp_path / "crashed", progress=lines.append)
    assert lines == [f"resumed {tmp_path / 'crashed' / 'state.pt'}: denoiser phase, step 2"]
    resumed.run()
    for a, b in [(whole.denoiser, resumed.denoiser), (whole.text, resumed.text), (whole.vae, resumed.vae)]:
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name
    assert whole.ema.state_dict()["shadow_params"][0].equal(resumed.ema.state_dict()["shadow_params"][0])
    log = [json.loads(s) for s in (tmp_path / "crashed" / "log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in log][-4:] == [("denoiser", i) for i in (1, 2, 3, 4)]


def test_a_work_folder_of_other_settings_is_refused(tmp_path):
    from tn_ray.diffusion.world.train import Trainer
    from tn_ray.errors import InputError

    Trainer(WorldGeneratorConfig(**SMALL), tmp_path, progress=lambda s: None).run(stop_after=1)
    other = WorldGeneratorConfig(**{**SMALL, "seed": 1})
    with pytest.raises(InputError, match="state.pt was written with other settings"):
        Trainer(other, tmp_path, progress=lambda s: None)


def test_the_shipped_pipeline_loads_with_plain_diffusers_and_matches_its_record():
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from tn_ray.diffusion.pipelines import load_pipeline, pipeline_revision
    from tn_ray.diffusion.world import package

    package.check_weights()
    rec = package.record()
    size = sum((package.WEIGHTS / name).stat().st_size for name in rec["sha256"])
    assert size <= 15 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(package.WEIGHTS)
    assert (type(pipe.unet), type(pipe.vae), type(pipe.text_encoder), type(pipe.tokenizer),
            type(pipe.scheduler)) == (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer,
                                      DDIMScheduler)
    from safetensors import safe_open

    for name in rec["sha256"]:  # stored as fp16
        with safe_open(str(package.WEIGHTS / name), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}, name
    ours = load_pipeline("world")
    assert ours.unet.dtype == torch.float32
    assert pipeline_revision("world") == package.revision()
    assert pipeline_revision("world").startswith("world@")
    assert WorldGeneratorConfig(**rec["settings"]) == shipped_settings()


def test_an_unknown_pipeline_name_is_one_line_before_any_work():
    from tn_ray.diffusion.pipelines import PipelineLoadError, check_source

    with pytest.raises(PipelineLoadError, match="unknown pipeline 'wrld': use 'tiny', 'world', a Hugging Face id"):
        check_source("wrld")


def test_damaged_shipped_weights_are_refused_by_name(tmp_path):
    import shutil

    from tn_ray.diffusion.world import package

    copy = tmp_path / "weights"
    shutil.copytree(package.WEIGHTS, copy)
    target = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(package.WorldWeightsError, match="unet/diffusion_pytorch_model.safetensors: sha256"):
        package.check_weights(copy)
