"""`tn-ray score`: a manifest of images scored with TextNorm; bad manifests are named."""
import json

import numpy as np
import pandas as pd
from PIL import Image

from tn_ray.cli import main
from tn_ray.textnorm import textnorm


def test_score_manifest(tmp_path, ray_session, capsys):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": "two dogs" if i < 2 else "a cat"})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    (tmp_path / "x.json").write_text(json.dumps({"two dogs": ["three dogs", "two cats", "two dogs"]}))
    out = tmp_path / "out"
    assert main(["score", "--manifest", str(tmp_path / "m.csv"), "--contrast", str(tmp_path / "x.json"),
                 "--models", "clip:tiny", "--tau", "0.5", "--out", str(out)]) == 0
    table = pd.read_csv(out / "rewards.csv")
    from tn_ray.scores import ScoreMatrix, model_slug

    m = ScoreMatrix.load(out / "scores" / f"{model_slug('clip:tiny')}.parquet")
    assert m.texts[0] == ["two dogs", "three dogs", "two cats"] and m.texts[3] == ["a cat"]
    np.testing.assert_allclose(table["textnorm(clip:tiny)"], textnorm(m.values, 0.5))
    assert (table["textnorm(clip:tiny)"].iloc[2:] == 1.0).all()  # no contrastive set -> 1

    pd.DataFrame({"img": ["0.png"], "prompt": ["x"]}).to_csv(tmp_path / "bad.csv", index=False)
    capsys.readouterr()
    assert main(["score", "--manifest", str(tmp_path / "bad.csv"), "--models", "clip:tiny"]) == 2
    assert "bad.csv: missing column(s) ['image']" in capsys.readouterr().err
