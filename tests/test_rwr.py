"""RWR on the fine-tuning core: exact resume, the KL term, the whole run (Ray Train, CLI, outputs),
the sweep trainable, and a learning test."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tn_ray.training.loop import Trainer, WorkerContext
from tn_ray.training.rwr import RwrConfig, RwrMethod

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a lighthouse", "a watercolor of a red circle"]


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> pd.DataFrame:
    """Six 32 px images with prompts and weights (the table RWR's driver hands the workers)."""
    folder = tmp_path_factory.mktemp("rwr_images")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(path)
        rows.append({"image": str(path), "prompt": PROMPTS[i % 2], "prompt_id": i % 2, "weight": 0.5 + i / 10})
    return pd.DataFrame(rows)


def _cfg(out: Path, **kw) -> RwrConfig:
    base = dict(out=str(out), prompts=PROMPTS, max_steps=4, seed=0, policy={"pipeline": "tiny"}, optimizer={"lr": 5e-3},
                reward={"models": ["brightness"], "use": "brightness"},
                generation={"pipeline": "tiny", "samples_per_prompt": 4, "height": 32, "width": 32},
                top_k=3, batch_size=2, beta=0.0, eval={"enabled": False}, checkpoint={"every": 2},
                logging={"progress_bar": False})
    return RwrConfig.model_validate({**base, **kw})


def _run(cfg: RwrConfig, examples: pd.DataFrame) -> dict:
    torch.set_num_threads(1)
    reports: list[dict] = []
    Trainer(cfg, RwrMethod, {"examples": examples}, WorkerContext(0, 1, torch.device("cpu"), cfg.out), reports.append).run()
    return reports


def _final_lora(out: Path) -> dict[str, torch.Tensor]:
    from tn_ray.training.checkpoint import Checkpoints

    ckpts = Checkpoints(out)
    return ckpts.load(ckpts.latest())["lora"]


def test_resume_after_stop_equals_uninterrupted_run(tmp_path, examples):
    """Stop after step 2 (checkpointed), rerun the same config: the final LoRA equals a run that
    never stopped, and the resumed run started from the checkpoint (not the base model)."""
    _run(_cfg(tmp_path / "straight"), examples)
    first = _run(_cfg(tmp_path / "resumed", stop_after_steps=2), examples)
    assert [r["step"] for r in first] == [2]
    second = _run(_cfg(tmp_path / "resumed"), examples)
    assert [r["step"] for r in second] == [4]  # steps 3, 4 only: it continued
    a, b = _final_lora(tmp_path / "straight"), _final_lora(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-7)
    # the TensorBoard events hold the per-step losses
    assert list((tmp_path / "straight" / "tensorboard").glob("events.out.tfevents.*"))


def _drift(out: Path, probe) -> float:
    """Mean squared difference between the trained policy's and the base model's predictions."""
    from tn_ray.training.config import PolicyBlock
    from tn_ray.training.policy import Policy

    policy = Policy.load(PolicyBlock(pipeline="tiny"), device="cpu")
    policy.load_lora_state(_final_lora(out))
    x, t = probe
    emb = policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        return float(((policy.noise_pred(x, t, emb) - policy.reference_pred(x, t, emb)) ** 2).mean())


def test_kl_term_keeps_the_policy_closer_to_the_base_model(tmp_path, examples):
    g = torch.Generator().manual_seed(1)
    probe = (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([100, 600]))
    drifts = {}
    for beta in (0.0, 5.0):
        out = tmp_path / f"beta{beta}"
        reports = _run(_cfg(out, beta=beta, max_steps=6, checkpoint={"every": 6}, optimizer={"lr": 2e-2}), examples)
        drifts[beta] = _drift(out, probe)
        assert (reports[-1]["kl"] > 0) == (beta > 0)  # the base model's forward runs only when beta > 0
    assert drifts[5.0] < 0.5 * drifts[0.0], drifts
