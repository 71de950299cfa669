"""BLIP-2: the three-step ITC and ITM rewards equal transformers' own
``Blip2ForImageTextRetrieval.forward``; cost invariants; local folders and offline
tokenizer detection; `tia2 eval` end to end."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tn_ray.cli import main
from tn_ray.data import tia2
from tn_ray.rewards import ModelLoadError, build
from tn_ray.rewards.blip2 import MAX_TEXT_TOKENS
from tn_ray.scoring.matrix import ScoreMatrix, model_slug

TEXTS = ["a photo of a cat", "two red circles and a blue square", "a lighthouse in a storm " * 8]


@pytest.fixture(scope="module")
def itc():
    return build("blip2:tiny")


@pytest.fixture(scope="module")
def itm():
    return build("blip2-itm:tiny")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8) for i in range(3)]


def forward_inputs(model, images, texts):
    pixels = model.processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    tok = model.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt")
    return pixels, tok["input_ids"], tok["attention_mask"]


def test_itc_equals_the_retrieval_models_own_forward(itc, images):
    ours = np.stack(itc.score_rows(images, [TEXTS] * len(images)))
    pixels, ids, mask = forward_inputs(itc, images, TEXTS)
    with torch.inference_mode():
        ref = itc.model(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                        use_image_text_matching_head=False).logits_per_image.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert np.all(np.abs(ours) <= 1 + 1e-6)  # a cosine
    assert np.ptp(ours, axis=0).min() > 1e-4 and np.ptp(ours, axis=1).min() > 1e-4


@pytest.mark.parametrize("pair_batch_size", [1, 4, 64])
def test_itm_equals_the_forward_match_log_odds(itm, images, pair_batch_size):
    itm.pair_batch_size = pair_batch_size
    try:
        ours = np.stack(itm.score_rows(images, [TEXTS] * len(images)))
    finally:
        itm.pair_batch_size = 64
    pixels, ids, mask = forward_inputs(itm, images, TEXTS)
    ref = np.empty_like(ours)
    with torch.inference_mode():
        for i in range(len(images)):  # forward scores pair k = (pixels[k], text k)
            logits = itm.model(pixel_values=pixels[i : i + 1].expand(len(TEXTS), -1, -1, -1), input_ids=ids,
                               attention_mask=mask, use_image_text_matching_head=True).logits_per_image
            ref[i] = (logits[:, 1] - logits[:, 0]).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert np.ptp(ref, axis=1).min() > 1e-4


def test_each_image_and_text_is_encoded_once(itc, itm, images):
    texts = [f"a photo of {n} dogs" for n in range(33)]
    for model in (itc, itm):
        calls = []
        hook = model.model.vision_model.register_forward_hook(lambda mod, args, out, calls=calls: calls.append(1))
        try:
            model._text_cache.clear()
            e0, t0 = model.images_encoded, model.texts_encoded
            model.score_rows(images, [texts] * len(images))
            model.score_rows(images[:1], [texts])
        finally:
            hook.remove()
        assert len(calls) == 2 and model.images_encoded - e0 == 4  # one tower pass per call
        assert model.texts_encoded - t0 == 33  # the second call reuses every text
    assert itm.pairs_scored >= 4 * 33


def test_prompts_are_truncated_to_32_tokens(itc, itm, images):
    long = TEXTS[2]
    assert len(itm.encode_texts([long])[0]) == MAX_TEXT_TOKENS
    for model in (itc, itm):
        a, b = model.score_rows(images[:1], [[long, long + " with a dragon"]])[0]
        assert a == pytest.approx(b, abs=1e-6)


def test_a_local_folder_loads_and_a_stub_tokenizer_is_refused(itc, images, tmp_path, monkeypatch):
    from transformers import BertTokenizer

    folder = tmp_path / "blip2-local"
    itc.model.save_pretrained(folder)
    itc.processor.save_pretrained(folder)
    itc.tokenizer.save_pretrained(folder)
    for name in ("blip2", "blip2-itm"):
        loaded = build(f"{name}:{folder}")
        tiny = itc if name == "blip2" else build("blip2-itm:tiny")
        np.testing.assert_allclose(
            loaded.score_rows(images, [TEXTS] * 3), tiny.score_rows(images, [TEXTS] * 3), atol=1e-5
        )
    # what transformers returns offline for a tokenizer whose files are missing: 5 entries
    stub = tmp_path / "stub"
    itc.model.save_pretrained(stub)
    itc.processor.save_pretrained(stub)
    BertTokenizer().save_pretrained(stub)
    with pytest.raises(ModelLoadError, match="has only 5 entries"):
        build(f"blip2:{stub}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache, offline
    with pytest.raises(ModelLoadError, match="huggingface-cli download Salesforce/blip2-itm-vit-g"):
        build("blip2")


def test_tia2_eval_scores_both_heads(tmp_path, tia2_dir, ray_session):
    labels = tia2.load_labels("counting", tia2_dir)
    first = labels[labels["prompt"] == labels["prompt"].iloc[0]]
    (tmp_path / "images" / "counting").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in first["image_id"]:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / "counting" / name)
    out = tmp_path / "out"
    assert (
        main(
            [
                "tia2",
                "eval",
                "--images",
                str(tmp_path / "images"),
                "--out",
                str(out),
                "--sets",
                "counting",
                "--max-prompts",
                "1",
                "--models",
                "blip2:tiny",
                "blip2-itm:tiny",
            ]
        )
        == 0
    )
    summary = pd.read_csv(out / "per_set.csv")
    assert {"blip2:tiny", "textnorm(blip2:tiny)", "blip2-itm:tiny", "textnorm(blip2-itm:tiny)"} <= set(
        summary["reward"]
    )
    for spec in ("blip2:tiny", "blip2-itm:tiny"):
        mat = ScoreMatrix.load(out / "scores" / f"{model_slug(spec)}.parquet")
        assert len(mat) == 50 and np.isfinite(mat.values).all()
        row = 7
        path = tmp_path / "images" / "counting" / mat.keys.loc[row, "image_id"]
        local = build(spec).score_rows([str(path)], [mat.texts[row]])[0]
        np.testing.assert_allclose(mat.values[row, : len(mat.texts[row])], local, atol=1e-5)
