"""The official ImageReward code (PyPI ``image-reward==1.5``) in a side environment, for the
equivalence test in ``test_imagereward.py``.

Why a side environment: image-reward 1.5 pins ``timm==0.6.13`` (open_clip 3.x needs
timm>=1.0.17) and does not import with transformers >= 4.56, so it cannot live in the
project's environment. ``official_python()`` builds, once, a venv under
``~/.cache/tn_ray/`` holding the package and its pins from PyPI (``--no-deps``, about
30-60 s on 2 cores; later runs reuse it). torch, torchvision, numpy and Pillow are NOT
reinstalled there: a ``.pth`` file appends the project's own site-packages *after* the
venv's, so the pinned transformers/timm/huggingface-hub shadow the project's versions while
both sides run the same torch kernels: the comparison isolates the model code.

Run as a script inside that venv (``python official_imagereward.py SPEC.json``), it builds
the package's own ``ImageReward`` model with random weights and scores image files with the
package's own ``ImageReward.score(prompt, image_path)``. Only two things are changed, both
outside the model code: (1) the package's ``__init__`` (which imports ReFL/diffusers,
``clip`` and CLIPScore/Aesthetic models unrelated to ImageReward) is skipped by loading the
submodules directly; (2) ``BertTokenizer.from_pretrained('bert-base-uncased')`` (a download)
returns a ``BertTokenizer`` built from the vocab file given in the spec; the package's own
``init_tokenizer`` then adds its [DEC]/[ENC] tokens as usual.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

PINS = [
    "image-reward==1.5",
    "timm==0.6.13",
    "fairscale==0.4.13",
    "transformers==4.55.4",
    "tokenizers==0.21.4",
    "huggingface-hub==0.34.4",
]


def _project_site() -> list[str]:
    return sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})


def env_dir() -> Path:
    """One venv per pin list, Python and project environment (its .pth points there)."""
    key = hashlib.sha256("\n".join([*PINS, sys.version, *_project_site()]).encode()).hexdigest()[:10]
    root = Path(os.environ.get("TN_RAY_CACHE", Path.home() / ".cache" / "tn_ray"))
    return root / f"imagereward-official-{key}"


def official_python(log=print) -> Path:
    """The side venv's python, building the venv first if it is not there yet."""
    final = env_dir()
    py = final / "bin" / "python"
    if (final / "READY").is_file():
        return py
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + f".build-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.time()
    log(f"building the official ImageReward environment in {final} (once; ~15 s)")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(tmp)], check=True)
    pip = subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", *PINS],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        raise RuntimeError(f"could not install {PINS} from PyPI into {tmp} (this test needs PyPI access once):\n"
                           f"{pip.stderr[-3000:]}")
    site = subprocess.run([str(tmp / "bin" / "python"), "-c", "import sysconfig; "
                                                              "print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "zz_tn_ray_project_site.pth").write_text("\n".join(_project_site()) + "\n")
    (tmp / "READY").write_text("\n".join(PINS) + f"\nbuilt in {time.time() - start:.0f} s\n")
    try:
        tmp.rename(final)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    # the venv's scripts hard-code the build path; only ``bin/python`` is used, which is fine
    return py


def run_official(spec: dict, workdir: Path, log=print) -> dict:
    """Run this file as a script in the side venv on ``spec``; returns its JSON result."""
    py = official_python(log)
    spec_path = workdir / "official_spec.json"
    out_path = workdir / "official_result.json"
    spec = {**spec, "out": str(out_path)}
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(py), __file__, str(spec_path)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("official ImageReward run failed "
                           f"({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out_path.read_text())


# --------------------------------------------------------------------------- side venv
def _import_official():
    """The package's ImageReward module without its ``__init__`` (see module docstring)."""
    import importlib.util
    import types

    spec = importlib.util.find_spec("ImageReward")
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, sub in [
        ("ImageReward", "."),
        ("ImageReward.models", "models"),
        ("ImageReward.models.BLIP", "models/BLIP"),
    ]:
        mod = types.ModuleType(name)
        mod.__path__ = [str(root / sub)]
        sys.modules[name] = mod
    import ImageReward.ImageReward as official

    return official


def main(spec_path: str) -> None:
    start = time.time()
    spec = json.loads(Path(spec_path).read_text())
    import timm
    import torch
    import transformers
    from transformers import BertTokenizer

    assert transformers.__version__ == "4.55.4" and timm.__version__ == "0.6.13", (
        transformers.__version__,
        timm.__version__,
    )
    vocab_file = spec["vocab_file"]
    original = BertTokenizer.from_pretrained.__func__

    def from_pretrained(cls, name, *args, **kwargs):
        if name == "bert-base-uncased":
            return cls(vocab_file=vocab_file)
        return original(cls, name, *args, **kwargs)

    BertTokenizer.from_pretrained = classmethod(from_pretrained)
    official = _import_official()

    torch.manual_seed(spec["seed"])
    model = official.ImageReward(med_config=spec["med_config"], device="cpu").eval()
    # The package initialises its MLP head with std 1/(768+1) through five linear layers:
    # every score is then the same constant. Give the head weights of a usable scale so
    # that the comparison means something (weights only; the code is untouched).
    with torch.no_grad():
        for layer in model.mlp.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, layer.in_features**-0.5)
                layer.bias.normal_(0.0, 0.1)
    built = time.time()
    torch.save(model.state_dict(), spec["checkpoint"])
    tok = model.blip.tokenizer
    input_ids = [tok(p, padding="max_length", truncation=True, max_length=35)["input_ids"] for p in spec["prompts"]]
    with torch.no_grad():
        scores = [[model.score(p, img) for img in spec["images"]] for p in spec["prompts"]]
    result = {
        "scores": scores,
        "input_ids": input_ids,
        "vocab_size": len(tok),
        "versions": {
            "image-reward": "1.5",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "timm": timm.__version__,
            "module": official.__file__,
        },
        "seconds": {"build": built - start, "total": time.time() - start},
    }
    Path(spec["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    # the project's environment (appended by the .pth) may hold `kernels`, an optional extra of newer
    # transformers that the pinned 4.55.4 imports when present and that needs a newer huggingface-hub
    # than the pinned one: hide it before transformers looks (find_spec returns None for a None module)
    sys.modules.setdefault("kernels", None)
    main(sys.argv[1])
