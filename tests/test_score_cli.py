"""`tn-ray score`: a manifest of images scored with TextNorm; bad manifests are named."""
import json
import re

import numpy as np
import pandas as pd
from cli_output import cli_stderr
from PIL import Image

from tn_ray.cli import main
from tn_ray.textnorm.equations import textnorm


def test_score_manifest(tmp_path, ray_session, capsys):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": "two dogs" if i < 2 else "a cat"})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    (tmp_path / "x.json").write_text(json.dumps({"two dogs": ["three dogs", "two cats", "two dogs"],
                                                 "a cat": ["two cats", "a dog"]}))
    out = tmp_path / "out"
    assert main(["score", "--manifest", str(tmp_path / "m.csv"), "--contrast", str(tmp_path / "x.json"),
                 "--models", "clip:tiny", "--tau", "0.5", "--out", str(out)]) == 0
    table = pd.read_csv(out / "rewards.csv")
    from tn_ray.scoring.matrix import ScoreMatrix, model_slug

    m = ScoreMatrix.load(out / "scores" / f"{model_slug('clip:tiny')}.parquet")
    assert m.texts[0] == ["two dogs", "three dogs", "two cats"] and m.texts[3] == ["a cat", "two cats", "a dog"]
    np.testing.assert_allclose(table["textnorm(clip:tiny)"], textnorm(m.values, 0.5))
    assert (table["textnorm(clip:tiny)"] < 1.0).all()

    # a prompt with no set, or an empty one, is an error naming it (its TextNorm would be 1.0), before any scoring
    for sets, named in [({"two dogs": ["three dogs"]}, "no contrastive set .*'a cat'"),
                        ({"two dogs": ["three dogs"], "a cat": []}, "'a cat' has an empty contrastive set"),
                        ({"two dogs": ["three dogs"], "a cat": "a dog"}, "x2.json: the set of prompt 'a cat' must be a "
                                                                         "list")]:
        (tmp_path / "x2.json").write_text(json.dumps(sets))
        capsys.readouterr()
        assert main(["score", "--manifest", str(tmp_path / "m.csv"), "--contrast", str(tmp_path / "x2.json"),
                     "--models", "clip:tiny", "--out", str(tmp_path / "out2")]) == 2
        err = cli_stderr(capsys)
        assert re.search(named, err) and err.count("\n") == 1, err
        assert not (tmp_path / "out2").exists()  # nothing started

    pd.DataFrame({"img": ["0.png"], "prompt": ["x"]}).to_csv(tmp_path / "bad.csv", index=False)
    capsys.readouterr()
    assert main(["score", "--manifest", str(tmp_path / "bad.csv"), "--models", "clip:tiny"]) == 2
    assert "bad.csv: missing column(s) ['image']" in capsys.readouterr().err
