"""A fine-tuning run's reports, from what its evaluations stored (any method, rerunnable).

Written under ``out`` (through :class:`tn_ray.storage.Store`: local folder or cloud URI)::

    eval.csv                 step, reward, mean, wins, images, base_mean (step 0 = the base model), and with
                             eval.path_kl path_kl: the step's mean path KL to the base model (nats; 0 at step 0)
    selection.json           the selected step by the paper's rule (wins under the training reward; or the
                             eval.select_by override, labelled as such), its checkpoint and counts per step,
                             and each judge's own view (its earliest-maximum step, its counts at the selected one)
    selected/pytorch_lora_weights.safetensors   the selected checkpoint's LoRA (load_lora_weights)
    curves.png               each reward column's mean over steps (training reward vs judges), wins, and with
                             path KL each column's wins against the path KL to the base model
    grids/<prompt_id>.png    an evaluation prompt's images (rows = seeds) across checkpoints
    human_eval/index.html    blinded side-by-side pages: the selected checkpoint vs the base model
    human_eval_key.csv       the answer key (outside the exported folder)
"""
from __future__ import annotations

import io
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tn_ray.analysis.human_eval import export
from tn_ray.storage import Store
from tn_ray.training.checkpoint import Checkpoints, step_name
from tn_ray.training.checkpoint_selection import describe_selection, selection_summary, win_counts
from tn_ray.training.config import FineTuneConfig
from tn_ray.training.evaluation import eval_prompts, read_path_kl, read_scores
from tn_ray.training.policy import LORA_FILE

log = logging.getLogger(__name__)


def eval_table(scores: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    counts = (
        win_counts(scores, base)
        if len(scores)
        else pd.DataFrame(columns=["step", "reward", "wins", "images", "mean", "base_mean"])
    )
    base_rows = base.groupby("reward")["value"].agg(["mean", "size"]).reset_index()
    zero = pd.DataFrame(
        {
            "step": 0,
            "reward": base_rows["reward"],
            "wins": 0,
            "images": base_rows["size"],
            "mean": base_rows["mean"],
            "base_mean": base_rows["mean"],
        }
    )
    table = pd.concat([zero, counts], ignore_index=True)[["step", "reward", "mean", "wins", "images", "base_mean"]]
    return table.sort_values(["step", "reward"]).reset_index(drop=True)


def with_path_kl(table: pd.DataFrame, path_kl: pd.DataFrame) -> pd.DataFrame:
    """``table`` (:func:`eval_table`) with a ``path_kl`` column: each step's mean path KL to the base model
    over the evaluation images (nats; 0 at step 0, the base model, by definition; NaN at a step without
    one). ``path_kl``: :func:`tn_ray.training.evaluation.read_path_kl`; empty = ``table`` unchanged."""
    if not len(path_kl):
        return table
    means = path_kl.groupby("step")["path_kl"].mean()
    means.loc[0] = 0.0
    return table.assign(path_kl=table["step"].map(means).astype("float64"))


def _wins_line(ax, x, wins, reward: str, column: str, train_reward: str) -> None:
    """One reward's win counts against ``x`` (step or path KL): the selecting column bold, the training reward red."""
    ax.plot(x, wins, marker="o", linewidth=2.5 if reward == column else 1,
            color="tab:red" if reward == train_reward else None,
            label=reward + (" (selects)" if reward == column else ""))


def plot_curves(table: pd.DataFrame, train_reward: str, column: str, flags: list[dict], selected: int | None) -> bytes:
    """Each column's mean over steps, and every column's wins over the base model (``column`` selects);
    with a ``path_kl`` column (:func:`with_path_kl`), every column's wins against the path KL to the base model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = [train_reward, *[r for r in dict.fromkeys(table["reward"]) if r != train_reward]]
    kl = "path_kl" in table.columns and table["path_kl"].notna().any()
    panels = len(rewards) + 1 + int(kl)
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.2))
    for ax, reward in zip(axes, rewards):
        rows = table[table["reward"] == reward]
        ax.plot(rows["step"], rows["mean"], marker="o", color="tab:red" if reward == train_reward else "tab:blue")
        ax.set_title(("training reward: " if reward == train_reward else "judge: ") + reward, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("mean over evaluation images")
        for f in flags:
            ax.axvline(f["step"], color="orange", linestyle="--", linewidth=1)
    if kl:  # wins share one scale across columns (means do not); points in step order, labelled by step
        ax = axes[-1]
        for reward in rewards:
            rows = table[(table["reward"] == reward) & table["path_kl"].notna()].sort_values("step")
            _wins_line(ax, rows["path_kl"], rows["wins"], reward, column, train_reward)
            for step, x, y in rows[["step", "path_kl", "wins"]].itertuples(index=False):
                ax.annotate(str(int(step)), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_title("images beating the base model vs path KL (labels: step)", fontsize=8)
        ax.set_xlabel("path KL to the base model (nats)")
        ax.legend(fontsize=7)
    ax = axes[len(rewards)]
    for reward in rewards:
        rows = table[(table["reward"] == reward) & (table["step"] > 0)]
        _wins_line(ax, rows["step"], rows["wins"], reward, column, train_reward)
    rule = "the paper's rule" if column == train_reward else "select_by override"
    ax.set_title(f"images beating the base model; selected by {column} ({rule})", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_xlabel("step")
    if selected is not None:
        ax.axvline(selected, color="tab:green", linestyle=":", linewidth=1.5)
        ax.set_xlabel(f"step (selected: {selected})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_grids(
    store: Store, prompts: Sequence[str], seeds: Sequence[int], steps: Sequence[int], cell: int = 96
) -> list[str]:
    from tn_ray.analysis.image_grids import prompt_grid

    rels = []
    for pid, prompt in enumerate(prompts):

        def image_of(row: str, step: int, pid: int = pid) -> bytes:
            folder = "eval/base" if step == 0 else f"eval/{step_name(step)}"
            return store.read_bytes(f"{folder}/{pid:05d}-{row.split()[-1]}.png")

        grid = prompt_grid(
            prompt,
            [f"seed {s}" for s in seeds],
            [0, *steps],
            image_of,
            cell,
            column_label=lambda s: "base" if s == 0 else f"step {s}",
        )
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        rel = f"grids/{pid:05d}.png"
        store.write_bytes(rel, buf.getvalue())
        rels.append(rel)
    return rels


def write_human_eval(
    store: Store, prompts: Sequence[str], seeds: Sequence[int], selected: int, seed: int = 0
) -> tuple[str, str]:
    """Blinded pages comparing, per prompt, the selected checkpoint's evaluation images with the base model's."""

    k = len(seeds)
    chosen, base = f"step {selected}", "base"
    sel_rows, image_rows = [], []
    for pid, prompt in enumerate(prompts):
        for i, s in enumerate(seeds):
            for reward, sample, folder in ((base, i, "eval/base"), (chosen, k + i, f"eval/{step_name(selected)}")):
                sel_rows.append({"n": k, "k": k, "reward": reward, "prompt_id": pid, "rank": i, "sample": sample})
                image_rows.append(
                    {
                        "prompt_id": pid,
                        "sample": sample,
                        "prompt": prompt,
                        "image_id": f"{folder.split('/')[-1]}-{pid:05d}-{s}",
                        "image": f"{folder}/{pid:05d}-{s}.png",
                    }
                )
    with tempfile.TemporaryDirectory() as tmp:
        out_dir, key = Path(tmp) / "human_eval", Path(tmp) / "human_eval_key.csv"
        export(
            pd.DataFrame(sel_rows),
            pd.DataFrame(image_rows),
            [(chosen, base)],
            k,
            k,
            seed,
            out_dir,
            key,
            store.read_bytes,
        )
        for f in out_dir.rglob("*"):
            if f.is_file():
                store.write_bytes(f"human_eval/{f.relative_to(out_dir).as_posix()}", f.read_bytes())
        store.write_bytes("human_eval_key.csv", key.read_bytes())
    return store.uri("human_eval/index.html"), store.uri("human_eval_key.csv")


def write_outputs(cfg: FineTuneConfig, train_prompts: Sequence[str]) -> dict[str, Any]:
    """Every report of the run at ``cfg.out``; returns name -> path/URI."""

    store = Store(cfg.out)
    scores, base = read_scores(cfg.out)
    if base is None:
        raise FileNotFoundError(f"{store.uri('eval/base.parquet')}: the run has no evaluation yet")
    table = with_path_kl(eval_table(scores, base), read_path_kl(cfg.out))
    store.write_text("eval.csv", table.to_csv(index=False))
    paths: dict[str, Any] = {
        "out": store.uri(""),
        "config": store.uri("config.yaml"),
        "eval_csv": store.uri("eval.csv"),
        "checkpoints": store.uri("checkpoints"),
        "tensorboard": store.uri("tensorboard"),
    }
    flags = json.loads(store.read_text("monitor_flags.json")) if store.exists("monitor_flags.json") else []
    column = cfg.selection_column
    steps = sorted(scores["step"].unique().tolist()) if len(scores) else []
    selected = None
    if steps:
        counts = table[table["step"] > 0]
        selection = selection_summary(counts, cfg.reward.use, cfg.judge_names(), cfg.eval.select_by)
        selected = selection["step"]
        ckpts = Checkpoints(cfg.out)
        selection = {**selection, "checkpoint": ckpts.uri(selected), "overoptimization_flags": flags}
        store.write_text("selection.json", json.dumps(selection, indent=1))
        store.write_bytes(f"selected/{LORA_FILE}", ckpts.lora_bytes(selected))
        paths.update(selection=store.uri("selection.json"), selected_checkpoint=store.uri("selected"))
        for line in describe_selection(selection):
            log.info(line)
    store.write_bytes("curves.png", plot_curves(table, cfg.reward.use, column, flags, selected))
    paths["curves"] = store.uri("curves.png")
    prompts = eval_prompts(cfg, train_prompts)
    if steps:
        write_grids(store, prompts, cfg.eval.seeds, steps)
        paths["grids"] = store.uri("grids")
        paths["human_eval"], paths["human_eval_key"] = write_human_eval(
            store, prompts, cfg.eval.seeds, selected, cfg.seed
        )
    if flags:
        paths["monitor_flags"] = store.uri("monitor_flags.json")
    return paths
