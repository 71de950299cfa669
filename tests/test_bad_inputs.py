"""Bad inputs and faults against the CLI: every one is a single line naming the file, key or
prompt, found before any work starts (no Ray, no model load) where it can be, and leaving
every existing file as it was. Also: the CLI's handling of OS errors and of errors raised
inside Ray tasks and actors, best-of-n reuse verifying the images it reuses, and the LLM
source naming the server it could not reach.

``python tests/test_bad_inputs.py docs/errors.md`` runs every case through the CLI and writes
the table of the messages they print now.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from cli_output import cli_stderr
from PIL import Image

from tn_ray.cli import main

# ---------------------------------------------------------------------------------------
# a small world of valid inputs each case breaks one thing of
# ---------------------------------------------------------------------------------------


class World:
    """Valid inputs under ``root``: two PNGs with a manifest and contrastive sets, a TIA2-shaped
    benchmark (labels, released sets, images), a prompt file and config files."""

    def __init__(self, root: Path):
        self.root = root
        rng = np.random.default_rng(0)
        (root / "img").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        self.manifest = self.csv("m.csv", [("img/0.png", "a cat"), ("img/1.png", "two dogs")])
        self.sets = self.json("sets.json", {"a cat": ["two cats", "a dog"], "two dogs": ["three dogs"]})
        # TIA2 layout: labels, released sets, images/<set>/<file>
        self.tia2 = root / "tia2"
        self.labels = self.tia2 / "human_annotations" / "human_labels_counting.json"
        self.labels.parent.mkdir(parents=True)
        self.labels.write_text(json.dumps({f"{i}.png": {"image": f"{i}.png", "caption": p, "human_labels": [1, 1, 0]}
                                           for i, p in enumerate(["a cat", "two dogs"])}))
        self.released = self.tia2 / "prompts" / "prompt_set_counting.json"
        self.released.parent.mkdir(parents=True)
        self.released.write_text(json.dumps({"a cat": ["two cats"], "two dogs": ["three dogs"]}))
        self.images = root / "bench"
        (self.images / "counting").mkdir(parents=True)
        for i in range(2):
            (self.images / "counting" / f"{i}.png").write_bytes((root / "img" / f"{i}.png").read_bytes())
        self.prompts = root / "prompts.txt"
        self.prompts.write_text("a cat\ntwo dogs\n")
        self.file = root / "a_file.txt"  # an existing file where a folder must go
        self.file.write_text("keep me\n")

    def path(self, rel: str) -> Path:
        return self.root / rel

    def csv(self, name: str, rows: list[tuple[str, str]]) -> Path:
        pd.DataFrame(rows, columns=["image", "prompt"]).to_csv(self.root / name, index=False)
        return self.root / name

    def json(self, name: str, data) -> Path:
        (self.root / name).write_text(json.dumps(data))
        return self.root / name

    def text(self, name: str, text: str | bytes) -> Path:
        p = self.root / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return p

    def yaml(self, name: str, data) -> Path:
        return self.text(name, yaml.safe_dump(data, sort_keys=False))

    def score(self, *extra: str, manifest: Path | None = None, models=("clip:tiny",)) -> list[str]:
        return ["score", "--manifest", str(manifest or self.manifest), "--models", *models,
                "--out", str(self.root / "out"), *extra]

    def tia2_eval(self, **overrides) -> dict:
        cfg = {"images": str(self.images), "tia2_dir": str(self.tia2), "out": str(self.root / "out"),
               "models": ["clip:tiny"], "sets": ["counting"], "contrast": "released"}
        cfg.update(overrides)
        return cfg

    def bestofn(self, **overrides) -> dict:
        cfg = {"out": str(self.root / "out"), "contrast": str(self.sets), "pools": [2], "top_k": [1],
               "models": ["clip:tiny"], "generation": {"pipeline": "tiny", "num_inference_steps": 2, "height": 32,
                                                       "width": 32}, "human_eval": None}
        for k, v in overrides.items():
            if isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k] = {**cfg[k], **v}
            else:
                cfg[k] = v
        return cfg

    def finetune(self, method: str, **overrides) -> dict:
        """A tiny RWR or DDPO config (every key valid) with ``overrides`` merged one level deep."""
        cfg = {
            "out": str(self.root / "out"),
            "prompts": ["a cat", "two dogs"],
            "max_steps": 2,
            "policy": {"pipeline": "tiny"},
            "reward": {"models": ["clip:tiny"], "use": "clip:tiny"},
            "eval": {
                "every": 1,
                "seeds": [0],
                "num_inference_steps": 2,
                "judges": [{"models": ["clip:tiny"], "use": "textnorm(clip:tiny)", "contrast": str(self.sets)}],
            },
        }
        if method == "rwr":
            cfg.update(
                generation={"samples_per_prompt": 2, "num_inference_steps": 2, "height": 32, "width": 32},
                top_k=1,
                batch_size=1,
            )
        else:
            cfg.update(sample={"num_steps": 2, "batch_size": 2, "num_batches_per_epoch": 1}, train={"batch_size": 2})
        for k, v in overrides.items():
            cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
        return cfg

    def sweep(self, **overrides) -> dict:
        cfg = {
            "name": "toy",
            "trainable": "toy_regression",
            "options": {"epochs": 2, "samples": 64, "steps_per_epoch": 2},
            "space": {"lr": {"loguniform": [1e-4, 0.1]}},
            "metric": "val_loss",
            "mode": "min",
            "num_samples": 2,
            "out": str(self.root / "sweep_out"),
            "verbose": 0,
        }
        cfg.update(overrides)
        return cfg


def truncated_png(w: World) -> Path:
    data = (w.root / "img" / "1.png").read_bytes()
    return w.text("img/1.png", data[: len(data) // 2])


@dataclass
class Case:
    id: str
    what: str  # the bad input, in words (the docs table)
    argv: Callable[[World], list[str]]
    expect: tuple[str, ...]  # regexes the one-line message must match (names of file / key / prompt)


C = Case
CASES = [
    # ---- tn-ray score: manifest, images, contrastive sets, options, outputs, weights ----
    C(
        "score-manifest-missing",
        "manifest path that does not exist",
        lambda w: w.score(manifest=w.path("nope.csv")),
        (r"manifest not found: .*nope\.csv",),
    ),
    C(
        "score-manifest-not-utf8",
        "manifest with Latin-1 bytes",
        lambda w: w.score(manifest=w.text("l1.csv", "image,prompt\nimg/0.png,caf\xe9\n".encode("latin-1"))),
        (r"l1\.csv: not UTF-8",),
    ),
    C(
        "score-manifest-no-column",
        "manifest without an `image` column",
        lambda w: w.score(manifest=w.text("nocol.csv", "img,prompt\nimg/0.png,a cat\n")),
        (r"nocol\.csv: missing column\(s\) \['image'\]",),
    ),
    C(
        "score-manifest-empty-prompt",
        "manifest row with an empty prompt",
        lambda w: w.score(manifest=w.text("blank.csv", "image,prompt\nimg/0.png,a cat\nimg/1.png,\n")),
        (r"blank\.csv: line 3 has an empty image or prompt",),
    ),
    C(
        "score-manifest-duplicate",
        "manifest listing one image twice",
        lambda w: w.score(manifest=w.csv("dup.csv", [("img/0.png", "a cat"), ("img/0.png", "two dogs")])),
        (r"dup\.csv: image .*0\.png is listed twice",),
    ),
    C(
        "score-image-missing",
        "manifest row whose image does not exist",
        lambda w: w.score(manifest=w.csv("gone.csv", [("img/0.png", "a cat"), ("img/9.png", "two dogs")])),
        (r"1 of 2 images in .*gone\.csv do not exist.*9\.png",),
    ),
    C(
        "score-image-text-as-jpg",
        "a text file named .jpg",
        lambda w: w.score(
            manifest=w.csv(
                "txt.csv", [("img/0.png", "a cat"), (str(w.text("img/note.jpg", "not an image")), "two dogs")]
            )
        ),
        (r"1 of 2 images in .*txt\.csv cannot be read: .*note\.jpg",),
    ),
    C(
        "score-image-truncated",
        "a truncated PNG",
        lambda w: (truncated_png(w), w.score())[1],
        (r"1 of 2 images in .*m\.csv cannot be read: .*1\.png",),
    ),
    C(
        "score-sets-invalid-json",
        "contrastive-set file that is not JSON",
        lambda w: w.score("--contrast", str(w.text("bad.json", '{"a cat": ["x"],\n oops}'))),
        (r"bad\.json: not valid JSON \(line 2, column 2",),
    ),
    C(
        "score-sets-not-utf8",
        "contrastive-set file in Latin-1",
        lambda w: w.score("--contrast", str(w.text("l1.json", '{"a cat": ["caf\xe9"]}'.encode("latin-1")))),
        (r"l1\.json: not UTF-8",),
    ),
    C(
        "score-sets-missing-prompt",
        "contrastive sets without an entry for a manifest prompt",
        lambda w: w.score("--contrast", str(w.json("part.json", {"a cat": ["two cats"]}))),
        (r"no contrastive set in .*part\.json", r"'two dogs'"),
    ),
    C(
        "score-sets-empty",
        "a prompt whose contrastive set is []",
        lambda w: w.score("--contrast", str(w.json("empty.json", {"a cat": ["two cats"], "two dogs": []}))),
        (r"'two dogs' has an empty contrastive set in .*empty\.json",),
    ),
    C(
        "score-sets-only-itself",
        "a prompt whose only contrastive prompt is itself",
        lambda w: w.score("--contrast", str(w.json("self.json", {"a cat": ["two cats"], "two dogs": ["two dogs"]}))),
        (r"'two dogs' has an empty contrastive set",),
    ),
    C(
        "score-sets-string",
        "a set given as a string instead of a list",
        lambda w: w.score("--contrast", str(w.json("str.json", {"a cat": ["two cats"], "two dogs": "three dogs"}))),
        (r"str\.json: the set of prompt 'two dogs' must be a list",),
    ),
    C(
        "score-sets-list",
        "a set file whose top level is a list",
        lambda w: w.score("--contrast", str(w.json("list.json", [["a cat", "two cats"]]))),
        (r"list\.json: contrastive sets must be a JSON object",),
    ),
    C(
        "score-sets-non-string",
        "a contrastive prompt that is a number",
        lambda w: w.score("--contrast", str(w.json("num.json", {"a cat": ["two cats", 3], "two dogs": ["x"]}))),
        (r"num\.json: the set of prompt 'a cat' holds 3",),
    ),
    C(
        "score-unknown-model",
        "an unknown reward model name",
        lambda w: w.score(models=("clipp:tiny",)),
        (r"unknown reward model 'clipp'",),
    ),
    C("score-bad-tau", "--tau 0", lambda w: w.score("--tau", "0"), (r"--tau",)),
    C("score-bad-batch", "--batch-size 0", lambda w: w.score("--batch-size", "0"), (r"batch_size",)),
    C(
        "score-out-is-file",
        "--out that is an existing file",
        lambda w: [*w.score()[:-2], "--out", str(w.file)],
        (r"output folder .*a_file\.txt is an existing file",),
    ),
    C(
        "score-out-under-file",
        "--out inside an existing file",
        lambda w: [*w.score()[:-2], "--out", str(w.file / "sub")],
        (r"its parent .*a_file\.txt is an existing file",),
    ),
    C(
        "score-out-not-writable",
        "--out on a filesystem that refuses writes (/sys)",
        lambda w: [*w.score()[:-2], "--out", "/sys/tn_ray_out"],
        (r"cannot write to the output folder /sys/tn_ray_out",),
    ),
    C(
        "score-weights-offline",
        "default models (clip, pickscore) offline, not in the HF cache",
        lambda w: w.score(models=("clip", "pickscore")),
        (
            r"weights not found offline",
            r"'clip' needs .*timm/vit_base_patch32_clip_224\.openai",
            r"'pickscore' needs .*yuvalkirstain/PickScore_v1",
        ),
    ),
    # ---- tn-ray tia2 eval: labels, sets, images, configs ----
    C(
        "tia2-no-images",
        "no image folder",
        lambda w: [
            "tia2",
            "eval",
            "--tia2-dir",
            str(w.tia2),
            "--models",
            "clip:tiny",
            "--sets",
            "counting",
            "--out",
            str(w.path("out")),
        ],
        (r"no image folder given \(--images DIR",),
    ),
    C(
        "tia2-dir-wrong",
        "--tia2-dir without human_annotations/",
        lambda w: [
            "tia2",
            "eval",
            "--images",
            str(w.images),
            "--tia2-dir",
            str(w.images),
            "--models",
            "clip:tiny",
            "--sets",
            "counting",
        ],
        (r"TIA2 directory .*bench has no human_annotations/",),
    ),
    C(
        "tia2-labels-invalid-json",
        "TIA2 label file that is not JSON",
        lambda w: (w.labels.write_text("{"), ["tia2", "eval", w.yaml_path("c.yaml", w.tia2_eval())])[1],
        (r"human_labels_counting\.json: not valid JSON \(line 1",),
    ),
    C(
        "tia2-labels-not-utf8",
        "TIA2 label file with a non-UTF-8 byte",
        lambda w: (w.labels.write_bytes(b'{"\xff": 1}'), ["tia2", "eval", w.yaml_path("c.yaml", w.tia2_eval())])[1],
        (r"human_labels_counting\.json: not UTF-8",),
    ),
    C(
        "tia2-released-set-string",
        "TIA2 prompt-set file with a string set",
        lambda w: (
            w.released.write_text(json.dumps({"a cat": "two cats", "two dogs": ["x"]})),
            ["tia2", "eval", w.yaml_path("c.yaml", w.tia2_eval())],
        )[1],
        (r"prompt_set_counting\.json: the set of prompt 'a cat' must be a list",),
    ),
    C(
        "tia2-images-missing",
        "benchmark image folder missing one image",
        lambda w: ((w.images / "counting" / "1.png").unlink(), ["tia2", "eval", w.yaml_path("c.yaml", w.tia2_eval())])[
            1
        ],
        (r"1 of 2 images are missing under .*bench",),
    ),
    C(
        "tia2-image-truncated",
        "benchmark image truncated",
        lambda w: (
            (w.images / "counting" / "1.png").write_bytes(b"\x89PNG\r\n"),
            ["tia2", "eval", w.yaml_path("c.yaml", w.tia2_eval())],
        )[1],
        (r"1 of 2 images in .*bench cannot be read: .*counting/1\.png",),
    ),
    C(
        "tia2-contrast-missing-prompt",
        "contrast file ({set} expanded) without a benchmark prompt",
        lambda w: (
            w.json("c_counting.json", {"a cat": ["two cats"]}),
            ["tia2", "eval", w.yaml_path("c.yaml", w.tia2_eval(contrast=str(w.path("c_{set}.json"))))],
        )[1],
        (r"no contrastive set in .*c_counting\.json", r"'two dogs'"),
    ),
    C(
        "tia2-out-is-file",
        "out: an existing file",
        lambda w: ["tia2", "eval", w.yaml_path("c.yaml", w.tia2_eval(out=str(w.file)))],
        (r"output folder .*a_file\.txt is an existing file",),
    ),
    C(
        "tia2-config-empty",
        "an empty YAML config",
        lambda w: ["tia2", "eval", str(w.text("empty.yaml", ""))],
        (r"empty\.yaml: the file is empty",),
    ),
    C(
        "tia2-config-invalid-yaml",
        "YAML that does not parse",
        lambda w: ["tia2", "eval", str(w.text("bad.yaml", "models: [clip:tiny\nsets: [counting]\n"))],
        (r"bad\.yaml: not valid YAML \(line \d+, column \d+\)",),
    ),
    C(
        "tia2-config-not-utf8",
        "YAML config in Latin-1",
        lambda w: ["tia2", "eval", str(w.text("l1.yaml", "out: caf\xe9\n".encode("latin-1")))],
        (r"l1\.yaml: not UTF-8",),
    ),
    C(
        "tia2-config-typo",
        "a misspelt key",
        lambda w: ["tia2", "eval", w.yaml_path("c.yaml", {**w.tia2_eval(), "modles": ["clip:tiny"]})],
        (r"key 'modles': unknown key",),
    ),
    C(
        "tia2-config-list",
        "a YAML config whose top level is a list",
        lambda w: ["tia2", "eval", str(w.text("list.yaml", "- a\n- b\n"))],
        (r"list\.yaml: top level must be a mapping",),
    ),
    C(
        "tia2-config-missing",
        "a config path that does not exist",
        lambda w: ["tia2", "eval", str(w.path("none.yaml"))],
        (r"config file not found: .*none\.yaml",),
    ),
    C(
        "tia2-unknown-set",
        "--sets with an unknown set",
        lambda w: ["tia2", "eval", "--images", str(w.images), "--tia2-dir", str(w.tia2), "--sets", "countin"],
        (r"key 'sets\.0'", r"countin"),
    ),
    # ---- tn-ray bestofn ----
    C(
        "bestofn-out-is-file",
        "out: an existing file",
        lambda w: ["bestofn", w.yaml_path("b.yaml", w.bestofn(out=str(w.file)))],
        (r"output folder .*a_file\.txt is an existing file",),
    ),
    C(
        "bestofn-generation-out-under-file",
        "generation.out inside an existing file",
        lambda w: ["bestofn", w.yaml_path("b.yaml", w.bestofn(generation={"out": str(w.file / "gen")}))],
        (r"its parent .*a_file\.txt is an existing file",),
    ),
    C(
        "bestofn-prompt-without-set",
        "a configured prompt with no contrastive set",
        lambda w: ["bestofn", w.yaml_path("b.yaml", w.bestofn(prompts=["a cat", "a bird"]))],
        (r"no contrastive set in .*sets\.json", r"'a bird'"),
    ),
    C(
        "bestofn-cross-field",
        "generation.samples_per_prompt smaller than the largest pool",
        lambda w: ["bestofn", w.yaml_path("b.yaml", w.bestofn(pools=[2, 8], generation={"samples_per_prompt": 4}))],
        (r"generation\.samples_per_prompt \(4\) is smaller than the largest pool 8",),
    ),
    C(
        "bestofn-pipeline-offline",
        "a hub pipeline that is not cached offline",
        lambda w: ["bestofn", w.yaml_path("b.yaml", w.bestofn(generation={"pipeline": "org/not-cached"}))],
        (r"pipeline 'org/not-cached' is not in the Hugging Face cache",),
    ),
    C(
        "bestofn-unknown-scheduler",
        "an unknown diffusers scheduler",
        lambda w: ["bestofn", w.yaml_path("b.yaml", w.bestofn(generation={"scheduler": "DDIMSchedular"}))],
        (r"unknown diffusers scheduler 'DDIMSchedular'",),
    ),
    C(
        "bestofn-reward-weights-offline",
        "a reward model whose weights are not cached offline",
        lambda w: ["bestofn", w.yaml_path("b.yaml", w.bestofn(models=["imagereward"]))],
        (r"'imagereward' needs hub repo 'THUDM/ImageReward'",),
    ),
    # ---- tn-ray rwr / ddpo: one preflight (tn_ray.training.preflight) before Ray starts ----
    C(
        "rwr-out-is-file",
        "out: an existing file",
        lambda w: ["rwr", w.yaml_path("r.yaml", w.finetune("rwr", out=str(w.file)))],
        (r"output folder .*a_file\.txt is an existing file",),
    ),
    C(
        "rwr-pipeline-offline",
        "policy.pipeline a hub id not cached offline",
        lambda w: ["rwr", w.yaml_path("r.yaml", w.finetune("rwr", policy={"pipeline": "org/not-cached"}))],
        (r"pipeline 'org/not-cached' is not in the Hugging Face cache",),
    ),
    C(
        "rwr-reward-weights-offline",
        "a training reward whose weights are not cached offline",
        lambda w: [
            "rwr",
            w.yaml_path("r.yaml", w.finetune("rwr", reward={"models": ["imagereward"], "use": "imagereward"})),
        ],
        (r"'imagereward' needs hub repo 'THUDM/ImageReward'",),
    ),
    C(
        "rwr-rules-without-prompts",
        "no prompts with reward.contrast 'rules' (it lists no prompts of its own)",
        lambda w: ["rwr", w.yaml_path("r.yaml", w.finetune("rwr", prompts=None))],
        (r"key 'prompts'|prompts: required when reward\.contrast is 'rules'",),
    ),
    C(
        "rwr-textnorm-prompt-without-set",
        "a TextNorm reward and a training prompt with no contrastive set",
        lambda w: [
            "rwr",
            w.yaml_path(
                "r.yaml",
                w.finetune(
                    "rwr",
                    prompts=["a cat", "a bird"],
                    reward={"models": ["clip:tiny"], "use": "textnorm(clip:tiny)", "contrast": str(w.sets)},
                    eval={"judges": [{"models": ["clip:tiny"], "use": "clip:tiny"}]},
                ),
            ),
        ],
        (r"no contrastive set in .*sets\.json", r"'a bird'"),
    ),
    C(
        "ddpo-out-under-file",
        "out inside an existing file",
        lambda w: ["ddpo", w.yaml_path("d.yaml", w.finetune("ddpo", out=str(w.file / "run")))],
        (r"its parent .*a_file\.txt is an existing file",),
    ),
    C(
        "ddpo-judge-weights-offline",
        "a held-out judge whose weights are not cached offline",
        lambda w: [
            "ddpo",
            w.yaml_path("d.yaml", w.finetune("ddpo", eval={"judges": [{"models": ["pickscore"], "use": "pickscore"}]})),
        ],
        (r"'pickscore' needs hub repo 'yuvalkirstain/PickScore_v1'",),
    ),
    C(
        "ddpo-judge-set-string",
        "a judge's contrastive-set file holding a string set",
        lambda w: [
            "ddpo",
            w.yaml_path(
                "d.yaml",
                w.finetune(
                    "ddpo",
                    eval={
                        "judges": [
                            {
                                "models": ["clip:tiny"],
                                "use": "textnorm(clip:tiny)",
                                "contrast": str(w.json("js.json", {"a cat": ["two cats"], "two dogs": "three dogs"})),
                            }
                        ]
                    },
                ),
            ),
        ],
        (r"js\.json: the set of prompt 'two dogs' must be a list",),
    ),
    # ---- tn-ray sweep ----
    C(
        "sweep-resume-never-ran",
        "--resume on a sweep that never ran",
        lambda w: ["sweep", w.yaml_path("s.yaml", w.sweep()), "--resume"],
        (r"--resume: sweep 'toy' has nothing to resume",),
    ),
    C(
        "sweep-set-through-scalar",
        "--set a.b=1 where a is a scalar",
        lambda w: ["sweep", w.yaml_path("s.yaml", w.sweep()), "--set", "metric.x=1"],
        (r"cannot set 'metric\.x': 'metric' is 'val_loss', not a mapping",),
    ),
    C(
        "sweep-set-no-equals",
        "--set without '='",
        lambda w: ["sweep", w.yaml_path("s.yaml", w.sweep()), "--set", "num_samples"],
        (r"--set expects KEY=VALUE",),
    ),
    C(
        "sweep-out-is-file",
        "--out that is an existing file",
        lambda w: ["sweep", w.yaml_path("s.yaml", w.sweep()), "--out", str(w.file)],
        (r"output folder .*a_file\.txt is an existing file",),
    ),
    C(
        "sweep-storage-under-file",
        "storage_path inside an existing file",
        lambda w: ["sweep", w.yaml_path("s.yaml", w.sweep()), "--storage-path", str(w.file / "tune")],
        (r"its parent .*a_file\.txt is an existing file",),
    ),
    C(
        "sweep-unknown-trainable",
        "an unknown trainable",
        lambda w: ["sweep", w.yaml_path("s.yaml", w.sweep(trainable="toy_regresion"))],
        (r"key 'trainable'",),
    ),
    C(
        "sweep-cross-field",
        "ASHA grace_period > max_t",
        lambda w: ["sweep", w.yaml_path("s.yaml", w.sweep(scheduler={"max_t": 2, "grace_period": 5}))],
        (r"'scheduler'", r"grace_period \(5\) must be <= max_t \(2\)"),
    ),
    # ---- tn-ray prompts synthesize ----
    C(
        "synth-input-not-utf8",
        "prompt file in Latin-1",
        lambda w: [
            "prompts",
            "synthesize",
            "--input",
            str(w.text("l1.txt", "caf\xe9\n".encode("latin-1"))),
            "--out",
            str(w.path("sets_out.json")),
        ],
        (r"l1\.txt: not UTF-8",),
    ),
    C(
        "synth-input-invalid-json",
        "prompt file .json that is not JSON",
        lambda w: [
            "prompts",
            "synthesize",
            "--input",
            str(w.text("p.json", '["a cat",')),
            "--out",
            str(w.path("sets_out.json")),
        ],
        (r"p\.json: not valid JSON \(line 1",),
    ),
    C(
        "synth-input-missing",
        "a prompt file that does not exist",
        lambda w: ["prompts", "synthesize", "--input", str(w.path("none.txt")), "--out", str(w.path("o.json"))],
        (r"prompt file not found: .*none\.txt",),
    ),
    C(
        "synth-out-is-dir",
        "--out that is an existing folder",
        lambda w: ["prompts", "synthesize", "--input", str(w.prompts), "--out", str(w.path("img"))],
        (r"the output file .*img is an existing folder",),
    ),
    C(
        "synth-out-under-file",
        "--out inside an existing file",
        lambda w: ["prompts", "synthesize", "--input", str(w.prompts), "--out", str(w.file / "sets.json")],
        (r"a_file\.txt is an existing file",),
    ),
    # ---- one strict command line: --set on every run command, finite floats, files of the wrong kind ----
    C(
        "rwr-set-unknown-key",
        "rwr --set with a misspelt key (rwr, ddpo and bestofn take --set as sweep does)",
        lambda w: ["rwr", w.yaml_path("r.yaml", w.finetune("rwr")), "--set", "top_kk=50"],
        (r"key 'top_kk': unknown key",),
    ),
    C(
        "ddpo-set-no-equals",
        "ddpo --set without '='",
        lambda w: ["ddpo", w.yaml_path("d.yaml", w.finetune("ddpo")), "--set", "max_steps"],
        (r"--set expects KEY=VALUE",),
    ),
    C(
        "bestofn-set-bad-value",
        "bestofn --set top_k to a value of the wrong type",
        lambda w: ["bestofn", w.yaml_path("b.yaml", w.bestofn()), "--set", "top_k=many"],
        (r"key 'top_k'", r"many"),
    ),
    C(
        "score-tau-inf",
        "--tau inf (TextNorm would be 1/(m+1) for every image)",
        lambda w: w.score("--tau", "inf"),
        (r"--tau inf: must be a finite number",),
    ),
    C(
        "label-lease-nan",
        "label serve --lease-s nan",
        lambda w: ["label", "serve", "--manifest", str(w.manifest), "--lease-s", "nan"],
        (
            r"--lease-s nan: must be a "
            r"finite",
        ),
    ),
    C(
        "rwr-beta-inf",
        "a config float set to .inf (every config float must be finite)",
        lambda w: ["rwr", w.yaml_path("r.yaml", w.finetune("rwr", beta=float("inf")))],
        (r"key 'beta': Input should be a finite number",),
    ),
    C(
        "ddpo-set-lr-nan",
        "--set optimizer.lr=.nan",
        lambda w: ["ddpo", w.yaml_path("d.yaml", w.finetune("ddpo")), "--set", "optimizer.lr=.nan"],
        (r"key 'optimizer\.lr': Input should be a finite number",),
    ),
    C(
        "tia2-set-tau-inf",
        "tia2 eval --set textnorm.default.tau=.inf",
        lambda w: ["tia2", "eval", w.yaml_path("c.yaml", w.tia2_eval()), "--set", "textnorm.default.tau=.inf"],
        (r"key 'textnorm\.default\.tau': Input should be a finite number",),
    ),
    C(
        "label-db-not-sqlite",
        "label serve --db: a text file, not an answer database",
        lambda w: ["label", "serve", "--manifest", str(w.manifest), "--db", str(w.file)],
        (r"--db .*a_file\.txt: not an answer database \(not a SQLite file\)",),
    ),
    C(
        "label-db-other-sqlite",
        "label export --db: a SQLite database of something else",
        lambda w: (
            _other_sqlite(w.path("other.sqlite")),
            [
                "label",
                "export",
                "--manifest",
                str(w.manifest),
                "--db",
                str(w.path("other.sqlite")),
                "--out",
                str(w.path("labels.json")),
            ],
        )[1],
        (r"--db .*other\.sqlite: a SQLite database of something else",),
    ),
    C(
        "label-db-folder",
        "label serve --db: a folder",
        lambda w: ["label", "serve", "--manifest", str(w.manifest), "--db", str(w.path("img"))],
        (r"--db .*img: is a folder",),
    ),
    C(
        "label-folder-is-file",
        "label serve --folder: a file",
        lambda w: ["label", "serve", "--folder", str(w.file)],
        (r"a_file\.txt: a file, not a folder of images",),
    ),
    C(
        "label-export-is-file",
        "label tally --export: a file",
        lambda w: ["label", "tally", "--export", str(w.file), "--out", str(w.path("t"))],
        (r"a_file\.txt: a file, not a best-of-n human_eval export folder",),
    ),
    C(
        "label-run-not-a-run",
        "label serve --run: a folder that is not a run folder",
        lambda w: ["label", "serve", "--run", str(w.path("img"))],
        (r"rewards\.parquet: not found; --run takes",),
    ),
    C(
        "tia2-images-is-file",
        "tia2 eval --images: a file",
        lambda w: ["tia2", "eval", w.yaml_path("c.yaml", w.tia2_eval(images=str(w.file)))],
        (r"--images .*a_file\.txt: a file, not a folder",),
    ),
    C(
        "tia2-dir-is-file",
        "--tia2-dir: a file",
        lambda w: ["tia2", "eval", "--images", str(w.images), "--tia2-dir", str(w.file), "--sets", "counting"],
        (r"TIA2 directory .*a_file\.txt has no human_annotations/",),
    ),
    C(
        "score-contrast-is-folder",
        "--contrast: a folder",
        lambda w: w.score("--contrast", str(w.path("img"))),
        (r"contrastive-set file .*img is not a file",),
    ),
    C(
        "rwr-config-is-folder",
        "rwr CONFIG: a folder",
        lambda w: ["rwr", str(w.path("img"))],
        (r"config path .*img is not a file",),
    ),
    C(
        "synth-unknown-source",
        "--source that does not exist",
        lambda w: [
            "prompts",
            "synthesize",
            "--input",
            str(w.prompts),
            "--out",
            str(w.path("o.json")),
            "--source",
            "rule",
        ],
        (r"key 'source': unknown source 'rule'",),
    ),
    C(
        "synth-llm-no-key",
        "--source llm without an API key",
        lambda w: [
            "prompts",
            "synthesize",
            "--input",
            str(w.prompts),
            "--out",
            str(w.path("o.json")),
            "--source",
            "llm",
            "--api-key-env",
            "TN_RAY_TEST_NO_SUCH_KEY",
            "--cache-dir",
            str(w.path("llm_cache")),
        ],
        (r"environment variable TN_RAY_TEST_NO_SUCH_KEY is not set",),
    ),
]


# found only where the work happens (inside a Ray actor): one line all the same
RAY_CASES = [
    C(
        "score-model-fails-in-actor",
        "a local ImageReward folder without its checkpoint (fails in the reward actor)",
        lambda w: (w.path("ir_model").mkdir(exist_ok=True), w.score(models=(f"imagereward:{w.path('ir_model')}",)))[1],
        (r"^tn-ray: error: ImageReward folder .*ir_model has no ImageReward\.pt$",),
    ),
]


def _other_sqlite(path: Path) -> None:
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE songs(title TEXT)")
    sqlite3.connect(path).close()


def _yaml_path(self: World, name: str, data) -> str:
    return str(self.yaml(name, data))


World.yaml_path = _yaml_path


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


class WorkStarted(BaseException):
    """Raised by the patched entry points of work: Ray starting or a model loading."""


@pytest.fixture
def no_work(monkeypatch, tmp_path):
    """Ray start, reward-model load, pipeline load, scoring and generation all raise; the HF
    cache is an empty folder (as on a machine that never downloaded anything)."""
    import huggingface_hub.constants

    def refuse(what):
        def fail(*args, **kwargs):
            raise WorkStarted(f"{what} was called before the bad input was reported")

        return fail

    monkeypatch.setattr("tn_ray.cluster.init_ray", refuse("init_ray"))
    monkeypatch.setattr("tn_ray.rewards.registry.build", refuse("reward model build"))
    monkeypatch.setattr("tn_ray.rewards.build", refuse("reward model build"))
    monkeypatch.setattr("tn_ray.diffusion.pipelines.load_pipeline", refuse("pipeline load"))
    monkeypatch.setattr("tn_ray.scoring.batch_scoring.score_matrices", refuse("score_matrices"))
    monkeypatch.setattr("tn_ray.diffusion.generation.generate", refuse("generate"))
    monkeypatch.setattr("tn_ray.experiments.bestofn.generate", refuse("generate"))
    monkeypatch.setattr("tn_ray.training.loop.fit", refuse("Ray Train fit"))
    empty = tmp_path / "hf_cache"
    empty.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TN_RAY_TEST_NO_SUCH_KEY", raising=False)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_naming_it_before_any_work(case, tmp_path, no_work, capsys):
    w = World(tmp_path / "w")
    argv = case.argv(w)  # the case's own setup (it may damage an input) ...
    before = snapshot(w.root)  # ... then everything as the user left it
    capsys.readouterr()
    code = main(argv)
    err = cli_stderr(capsys)
    assert code == 2 and err.startswith("tn-ray: error:") and err.count("tn-ray: error:") == 1, err
    assert "Traceback" not in err
    if err.startswith("tn-ray: error: invalid configuration in "):
        # a validation error: one line per bad key, each naming it; never a dump of the config
        assert all(x.startswith("  ") and len(x) < 300 for x in err.splitlines()[1:]), err
    else:
        assert err.count("\n") == 1, err  # exactly one line
    for pattern in case.expect:
        assert re.search(pattern, err), f"{pattern!r} not in {err!r}"
    after = snapshot(w.root)
    assert after == before, "an existing file was changed or removed, or a file was written"
    assert not (w.root / "out").exists() or not any((w.root / "out").iterdir())
    assert not (w.root / "sweep_out").exists() or not any((w.root / "sweep_out").iterdir())


def test_every_case_is_distinct_and_there_are_at_least_thirty():
    assert len({c.id for c in CASES}) == len(CASES) >= 30


# ---------------------------------------------------------------------------------------
# the CLI: user OS errors and TnRayErrors are one line, bugs keep their traceback, errors
# raised inside Ray tasks and actors reach the user as the original one line
# ---------------------------------------------------------------------------------------


def _ray_task_error(err: Exception):
    import traceback

    from ray.exceptions import RayTaskError

    try:
        raise err
    except Exception as e:
        return RayTaskError(
            "RewardWorker.__init__", traceback.format_exc(), e, proctitle="ray::MapWorker", pid=1, ip="127.0.0.1"
        )


def _raisers():
    from ray.exceptions import ActorDiedError

    from tn_ray.rewards.base import ModelLoadError

    def wrapped(err):
        try:
            raise err
        except Exception as inner:
            try:
                raise RuntimeError("ray data gave up") from inner
            except RuntimeError as outer:
                return outer

    return [
        (
            "PermissionError",
            PermissionError(13, "Permission denied", "/data/out/x.json"),
            "tn-ray: error: Permission denied: /data/out/x.json",
        ),
        ("FileExistsError", FileExistsError(17, "File exists", "/data/out"), "tn-ray: error: File exists: /data/out"),
        (
            "NotADirectoryError",
            NotADirectoryError(20, "Not a directory", "/data/file/out"),
            "tn-ray: error: Not a directory: /data/file/out",
        ),
        (
            "IsADirectoryError",
            IsADirectoryError(21, "Is a directory", "/data/dir"),
            "tn-ray: error: Is a directory: /data/dir",
        ),
        (
            "ModelLoadError",
            ModelLoadError("could not load CLIP 'clip': offline"),
            "tn-ray: error: could not load CLIP 'clip': offline",
        ),
        (
            "RayTaskError(ModelLoadError)",
            _ray_task_error(ModelLoadError("no weights for 'x'")).as_instanceof_cause(),
            "tn-ray: error: no weights for 'x'",
        ),
        (
            "ActorDiedError(creation task)",
            ActorDiedError(_ray_task_error(ModelLoadError("folder /m has no ImageReward.pt"))),
            "tn-ray: error: folder /m has no ImageReward.pt",
        ),
        (
            "wrapped ActorDiedError",
            wrapped(ActorDiedError(_ray_task_error(ModelLoadError("no weights for 'y'")))),
            "tn-ray: error: no weights for 'y'",
        ),
    ]


@pytest.mark.parametrize("index", range(8))
def test_cli_prints_user_os_errors_and_ray_wrapped_user_errors_as_one_line(index, monkeypatch, capsys):
    name, err, expected = _raisers()[index]

    def command(args):
        raise err

    monkeypatch.setattr("tn_ray.commands.tia2.stats", command)
    assert main(["tia2", "stats"]) == 2, name
    out = cli_stderr(capsys)
    assert out == expected + "\n", (name, out)


@pytest.mark.parametrize("bug", [KeyError("x"), ZeroDivisionError("division by zero"), RuntimeError("no such file")])
def test_a_bug_keeps_its_traceback(bug, monkeypatch):
    def command(args):
        raise bug

    monkeypatch.setattr("tn_ray.commands.tia2.stats", command)
    with pytest.raises(type(bug)):
        main(["tia2", "stats"])


@pytest.mark.parametrize("case", RAY_CASES, ids=[c.id for c in RAY_CASES])
def test_an_error_raised_in_a_ray_actor_reaches_the_user_as_one_line(case, tmp_path, ray_session, capsys):
    """A model whose constructor fails inside a Ray Data actor (the driver cannot tell before the
    actor looks) -> the original error's one line, last on stderr; no traceback of ours."""
    w = World(tmp_path / "w")
    argv = case.argv(w)
    before = snapshot(w.root)
    capsys.readouterr()
    assert main(argv) == 2
    err = cli_stderr(capsys)
    lines = [x for x in err.splitlines() if x.startswith("tn-ray: error:")]
    assert len(lines) == 1 and err.rstrip().splitlines()[-1] == lines[0], err  # the last line is the useful one
    for pattern in case.expect:
        assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert {k: v for k, v in snapshot(w.root).items() if not k.startswith("out/")} == before


# ---------------------------------------------------------------------------------------
# best-of-n reuse: what is reused is verified (size, sha256), a damaged image made again
# ---------------------------------------------------------------------------------------


def _recorded_images(out: Path, cfg, prompts: list[str]):
    """A finished generation run in ``out`` made without Ray: one GenerationWorker in this
    process (the bytes a Ray run makes, see test_generation), its manifest recorded."""
    from tn_ray.diffusion.generation import GenerationWorker, check_output, manifest_table
    from tn_ray.diffusion.seeds import seed_of
    from tn_ray.storage import Store

    store = Store(out)
    check_output(store, cfg, prompts)
    rows = pd.DataFrame(
        [(i, p, s, seed_of(cfg.seed, p, s)) for i, p in enumerate(prompts) for s in range(cfg.samples_per_prompt)],
        columns=["prompt_id", "prompt", "sample", "seed"],
    )
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # as a Ray actor with one CPU: the thread count changes float sums, so the bytes, on some CPUs
    try:
        manifest = GenerationWorker(cfg.model_dump(mode="json"), str(out))(rows)
    finally:
        torch.set_num_threads(threads)
    manifest_table(store).append(manifest)
    return store


def _gen_config(out: Path):
    from tn_ray.diffusion.generation import GenerationConfig

    return GenerationConfig(
        out=str(out),
        pipeline="tiny",
        num_inference_steps=2,
        height=32,
        width=32,
        samples_per_prompt=2,
        pipeline_batch_size=2,
        batch_size=2,
        num_actors=1,
    )


def test_damaged_recorded_images_are_found_by_size_and_sha256(tmp_path, caplog):
    from tn_ray.diffusion.generation import drop_damaged, image_id, image_path, manifest_table, read_manifest
    from tn_ray.storage import Store

    out = tmp_path / "gen"
    store = Store(out)
    rows = []
    for pid, sample in [(0, 0), (0, 1), (1, 0), (1, 1)]:  # recorded files (the check reads bytes, no decoding)
        data = f"image {pid} {sample}".encode() * 10
        store.write_bytes(image_path(pid, sample), data)
        rows.append(
            (
                pid,
                "p",
                sample,
                0,
                image_id(pid, sample),
                image_path(pid, sample),
                hashlib.sha256(data).hexdigest(),
                len(data),
            )
        )
    manifest_table(store).append(
        pd.DataFrame(rows, columns=["prompt_id", "prompt", "sample", "seed", "image_id", "path", "sha256", "bytes"])
    )
    images = sorted((out / "images").rglob("*.png"))
    truncated, replaced, removed = images[1], images[2], images[3]
    truncated.write_bytes(truncated.read_bytes()[:40])
    replaced.write_bytes(replaced.read_bytes().replace(b"image", b"IMAGE"))  # same size, other bytes
    removed.unlink()
    with caplog.at_level("WARNING", logger="tn_ray.diffusion.generation"):
        kept, damaged = drop_damaged(store, read_manifest(store))
    assert damaged == {(0, 1), (1, 0), (1, 1)} and kept[["prompt_id", "sample"]].values.tolist() == [[0, 0]]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "3 of 4 recorded images are damaged and will be generated again" in said
    assert f"{truncated}: 40 bytes, the manifest recorded" in said
    assert f"{replaced}: " in said and f"{removed}: missing" in said
    assert len(read_manifest(store)) == 1  # the stored manifest no longer claims them


def test_a_damaged_image_is_regenerated_on_rerun_saying_so(tmp_path, ray_session, caplog):
    from tn_ray.diffusion.generation import generate, read_manifest
    from tn_ray.storage import Store

    out = tmp_path / "gen"
    cfg, prompts = _gen_config(out), ["a red cat", "two dogs"]
    store = _recorded_images(out, cfg, prompts)
    first = read_manifest(store)
    digests = snapshot(out / "images")
    damaged = out / "images" / "00001" / "00000.png"
    good = damaged.read_bytes()
    damaged.write_bytes(good[: len(good) // 2])  # truncated on disk after the run
    untouched = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png") if p != damaged}

    with caplog.at_level("WARNING", logger="tn_ray.diffusion.generation"):
        again = generate(prompts, cfg)  # Ray makes the one damaged image again
    said = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(said) == 1 and str(damaged) in said[0] and "bytes, the manifest recorded" in said[0], said
    assert damaged.read_bytes() == good  # made again, bit-identical (seeded)
    assert snapshot(out / "images") == digests
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched  # the sound images were reused as they were
    assert again["sha256"].tolist() == first["sha256"].tolist()
    assert len(read_manifest(Store(out))) == 4


def test_a_corrupt_generation_record_is_named(tmp_path, monkeypatch):
    from tn_ray.diffusion.generation import GenerationConfig, generate
    from tn_ray.errors import InputError

    monkeypatch.setattr("tn_ray.cluster.init_ray", lambda *a, **k: (_ for _ in ()).throw(WorkStarted("ray")))
    out = tmp_path / "gen"
    out.mkdir()
    (out / "generation.json").write_text('{"pipeline": "tiny",')
    cfg = GenerationConfig(out=str(out), pipeline="tiny", samples_per_prompt=1)
    with pytest.raises(InputError, match=r"gen/generation\.json: not valid JSON \(line 1"):
        generate(["a cat"], cfg)
    assert (out / "generation.json").read_text() == '{"pipeline": "tiny",'


# ---------------------------------------------------------------------------------------
# the LLM source against a server that cannot be reached names the URL it tried
# ---------------------------------------------------------------------------------------


def test_llm_unreachable_server_is_named(tmp_path):
    import socket

    from pydantic import SecretStr

    from tn_ray.prompts.llm import LlmSource
    from tn_ray.prompts.settings import LlmConfig

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://user:secret@127.0.0.1:{port}/v1?token=abc"
    cfg = LlmConfig(cache_dir=str(tmp_path / "cache"), max_retries=0, attempts=1, timeout_s=5, fallback=False)
    source = LlmSource(cfg, api_key=SecretStr("k"), base_url=url)
    made = source.one("a red cat")
    assert not made.prompts
    assert f"APIConnectionError to http://127.0.0.1:{port}/v1" in made.error, made.error
    assert "secret" not in made.error and "token" not in made.error


# ---------------------------------------------------------------------------------------
# docs/errors.md: the table of cases with the message each prints now
# ---------------------------------------------------------------------------------------


def write_table(path: Path) -> None:
    import contextlib
    import io
    import os
    import tempfile

    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        huggingface_hub.constants.HF_HUB_CACHE = str(Path(tmp) / "empty_hf_cache")
        for i, case in enumerate(CASES + RAY_CASES, 1):
            w = World(Path(tmp) / case.id)
            argv = case.argv(w)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(argv)
            line = next((x for x in err.getvalue().splitlines() if x.startswith("tn-ray: error:")), err.getvalue())
            if "invalid configuration" in line:  # a validation error: its lines, joined
                line = " ".join(x.strip() for x in err.getvalue().splitlines())
            shown = " ".join(argv).replace(str(w.root), "$W")
            line = line.replace(str(w.root), "$W")
            n_lines = len(err.getvalue().rstrip().splitlines())
            rows.append(f"| {i} | {case.what} | `tn-ray {shown}` | {code} | {n_lines} | `{line.replace('|', '/')}` |")
    text = [
        "# Bad inputs: what the CLI prints",
        "",
        "Generated by `python tests/test_bad_inputs.py docs/errors.md`: each case is run through the CLI",
        "(`tn_ray.cli.main`, offline, an empty Hugging Face cache); `$W` is the case's scratch folder.",
        "Every case exits with status 2 and prints one line naming the file, key or prompt (a",
        "configuration error prints one line per bad key, shown joined here).",
        f"Cases 1-{len(CASES)} are found before Ray starts or any model loads: `tests/test_bad_inputs.py`",
        "asserts that (Ray start, model and pipeline loads, scoring and generation are patched to fail),",
        "and that no existing file is changed or removed and no output is written.",
        f"Case {len(CASES) + 1} can only be found where the work happens, inside a reward actor: the error",
        "raised there reaches the user as its own one line, the last line on stderr (Ray's logging of",
        "the dead actor comes before it; the `stderr lines` column counts everything printed).",
        "Anything that is not a user error is a bug and keeps its traceback.",
        "",
        "Related, not errors: a best-of-n rerun that finds a recorded image damaged on disk (size or",
        "sha256 differ from the manifest) logs `N of M recorded images are damaged and will be generated",
        "again: <file>: <why>` and makes them again (`tests/test_bad_inputs.py::",
        "test_a_damaged_image_is_regenerated_on_rerun_saying_so`); the LLM source names the server it",
        "could not reach (`APIConnectionError to http://host:port/v1 after 3 client retries`).",
        "",
        "| # | bad input | command | exit | stderr lines | message |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    path.write_text("\n".join(text))


if __name__ == "__main__":
    import logging

    logging.disable(logging.CRITICAL)
    write_table(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/errors.md"))


def test_ray_log_lines_are_dropped_from_a_captured_error_and_nothing_else():
    """The filter the one-line checks read stderr through (tests/cli_output.py): the raylet warning that once
    broke a check, a worker's line with and without colour, and a multi-word actor name are Ray's; an error that
    mentions a pid or starts with a parenthesis is kept."""
    from cli_output import without_ray_logs

    err = (
        "\x1b[33m(raylet)\x1b[0m [2026-12-07 20:52:06,953 E 22496 22507] (raylet) file_system_monitor.cc:116: "
        "/tmp/ray/session_x is over 95% full\n"
        "tn-ray: error: invalid configuration in /tmp/g.yaml:\n"
        "\x1b[36m(RayTrainWorker pid=16656)\x1b[0m Loading weights\n"
        "(RewardWorker pid=18782, ip=10.0.0.1) WARNING:root:No pretrained weights\n"
        "(pid=77) started\n"
        "  key 'ema.decay': Input should be less than 1 (got 1.0) (pid=3 is not Ray's)\n"
        "(see docs/grpo.md)\n"
    )
    assert without_ray_logs(err) == (
        "tn-ray: error: invalid configuration in /tmp/g.yaml:\n"
        "  key 'ema.decay': Input should be less than 1 (got 1.0) (pid=3 is not Ray's)\n"
        "(see docs/grpo.md)\n"
    )
