"""benchmarks/bench_scale.py: the quick mode runs through its main() on real-size SD 2.1 (random
weights, 64 px, one step) and CLIP ViT-B/32, and its JSON line has every key of the measurements
it ran, finite and positive; bad input is one line before any model is built."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from cli_output import cli_stderr

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "benchmarks" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_bench()


def test_architectures_have_the_published_parameter_counts():
    """The configs build the published shapes (parameter counts of the released checkpoints),
    on the meta device: no memory, no weights."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tn_ray.diffusion import architectures as A

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, **A.SD21_UNET)
        text = CLIPTextModel(CLIPTextConfig(**A.SD21_TEXT))
    assert A.parameter_count(unet) == 865_910_724  # stabilityai/stable-diffusion-2-1 unet: 865.9 M
    assert A.parameter_count(text) == 340_387_840  # OpenCLIP-H text tower, 23 layers


def test_fill_random_is_seeded_and_finite():
    import torch

    from tn_ray.diffusion.architectures import fill_random

    def build():
        return fill_random(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32)), seed=3)

    a, b = build(), build()
    assert torch.equal(a[0].weight, b[0].weight)
    assert torch.isfinite(a[0].weight).all()
    assert abs(float(a[0].weight.detach().std()) - 64 ** -0.5) < 0.02  # N(0, 1/fan_in)
    assert torch.equal(a[0].bias, torch.zeros(32)) and torch.equal(a[1].weight, torch.ones(32))


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--only", "sd22"], r"unknown architecture or measurement 'sd22'; architectures: sd21, sd35m"),
    (["--quick", "--only", "sd21", "--resolution", "100"], r"resolution 100 px: sd21 takes multiples of 8 px"),
    (["--quick", "--only", "sd35m", "--resolution", "520"], r"resolution 520 px: sd35m takes multiples of 16 px"),
])
def test_bad_input_is_one_line_before_any_model(bench, argv, message, capsys, monkeypatch):
    import re

    from tn_ray.diffusion import architectures

    def no_build(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(architectures, "sd21_pipeline", no_build)
    monkeypatch.setattr(architectures, "sd35m_pipeline", no_build)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = cli_stderr(capsys).strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_quick_mode_json_line(bench, capsys):
    """SD 2.1 at real size, 64 px, one step, batch 1, with CLIP ViT-B/32: scoring, generation, RWR
    and DDPO end to end (about a minute on 2 cores)."""
    result = bench.main(["--quick", "--steps", "1", "--budget", "240",
                         "--only", "sd21", "clip-b32", "scoring", "generation", "rwr", "ddpo"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line) == result
    expected = [
        "score_pairs_per_s_textnorm_clip-b32",
        "score_pairs_per_s_naive_clip-b32",
        "score_textnorm_over_naive_clip-b32",
        "gen_images_per_s_sd21_64",
        "vae_decode_peak_mb_plain",
        "vae_decode_peak_mb_slicing",
        "vae_decode_peak_mb_tiling",
        "rwr_steps_per_s_r4_bf16_nokl",
        "rwr_steps_per_s_r4_bf16_kl",
        "rwr_peak_mb_r4_bf16_nokl",
        "rwr_peak_mb_r4_bf16_kl",
        "rwr_step_kl_over_nokl",
        "rwr_peak_kl_over_nokl",
        "rwr_second_unet_copy_mb",
        "ddpo_samples_per_s",
        "ddpo_sample_s_per_sample",
        "ddpo_reward_s_per_sample",
        "ddpo_train_s_per_sample",
    ]
    missing = [k for k in expected if k not in result]
    assert not missing, (missing, result["skipped"])
    numbers = {k: v for k, v in result.items() if k not in ("device", "mode", "memory_method", "skipped")}
    bad = {k: v for k, v in numbers.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)}
    assert not bad, bad
    assert result["mode"] == "quick" and result["device"].startswith("cpu")
    # a second UNet for the reference model would cost its weights: 865.9 M bf16 parameters
    assert result["rwr_second_unet_copy_mb"] == pytest.approx(865_910_724 * 2 / 2**20, rel=1e-3)
    # TextNorm scoring encodes each image once: far more pairs per second than naive per-pair scoring
    assert result["score_textnorm_over_naive_clip-b32"] > 3
    assert not any(s.startswith("sd35") for s in result["skipped"])
