"""Reward models: registry, the three-step interface, offline-load detection, text trimming."""
import numpy as np
import pytest
import torch
from PIL import Image

from tn_ray.rewards import ModelLoadError, RewardSpec, available, build, parse
from tn_ray.rewards.base import check_tokenizer


def images(n, size=40, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module", params=["clip:tiny", "pickscore:tiny"])
def model(request):
    return build(request.param)


def test_registry_names_and_errors():
    assert {"clip", "pickscore"} <= set(available())
    assert parse("CLIP:tiny") == RewardSpec("clip", "tiny")
    with pytest.raises(KeyError, match="unknown reward model 'clipp'.*available: "):
        parse("clipp:tiny")


def test_score_rows_equals_the_three_steps_and_encodes_each_image_once(model):
    ims = images(4)
    texts = [["two dogs", "three dogs"], ["two dogs", "three dogs"], ["a cat"], ["two dogs", "a cat", "a bird"]]
    before_img, before_txt = model.images_encoded, model.texts_encoded
    got = model.score_rows(ims, texts)
    assert model.images_encoded - before_img == 4
    distinct = {t for ts in texts for t in ts}
    assert model.texts_encoded - before_txt <= len(distinct)
    with torch.inference_mode():
        img = model.encode_images(ims)
        for i, ts in enumerate(texts):
            direct = model.score(img[i : i + 1], model.encode_texts(ts)).numpy()[0]
            np.testing.assert_allclose(got[i], direct, rtol=1e-4, atol=1e-4)
    model.score_rows(ims[:1], [["two dogs", "a cat"]])
    assert model.texts_encoded - before_txt == len(distinct)  # cached across calls


def test_scores_depend_on_image_and_text(model):
    s = np.stack(model.score_rows(images(3, seed=1), [["a red circle", "a blue square"]] * 3))
    assert np.ptp(s[:, 0]) > 0 and np.ptp(s[0]) > 0


def test_clip_text_trimming_is_exact():
    from tn_ray.rewards.clip import encode_text_trimmed

    m = build("clip:tiny")
    tok = m.tokenizer(["a photo of two dogs", "a cat", "an extremely long prompt " * 3])
    with torch.inference_mode():
        np.testing.assert_allclose(encode_text_trimmed(m.model, tok), m.model.encode_text(tok), atol=1e-5)


def test_pickscore_tiny_tokenizer_is_clips_real_bpe():
    import open_clip

    m = build("pickscore:tiny")
    prompt = "A photo of 3 Dogs, jumping!"
    ours = m.processor.tokenizer([prompt])["input_ids"][0]
    ref = open_clip.get_tokenizer("ViT-B-32")([prompt])[0]
    assert ours == ref[: len(ours)].tolist() and ref[len(ours):].eq(0).all()


def test_near_empty_tokenizer_is_refused():
    class Stub:
        def __len__(self):
            return 3

    with pytest.raises(ModelLoadError, match="'some/model' has only 3 entries.*local directory"):
        check_tokenizer(Stub(), "some/model")


def test_missing_weights_raise_naming_the_model(tmp_path):
    with pytest.raises(ModelLoadError, match="does-not/exist"):
        build("pickscore:does-not/exist")
    with pytest.raises(ModelLoadError, match="clip:ViT-B-32=.*missing.bin"):
        build(f"clip:ViT-B-32={tmp_path}/missing.bin")


@pytest.mark.parametrize("spec", ["clip:tiny", "pickscore:tiny"])
def test_tiny_weights_are_identical_in_every_build_and_leave_the_global_rng_alone(spec):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build(spec)
    assert torch.equal(torch.rand(3), expected)
    b = build(spec)
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name
