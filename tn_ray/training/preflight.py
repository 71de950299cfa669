"""Everything a user can get wrong in a fine-tuning run, checked in the driver before Ray
starts or any model loads (the same checks for RWR and DDPO).

- the run folder can be written (a file in its place, a parent that is a file, no permission);
- the base pipeline can be found (offline: in the Hugging Face cache or a local folder);
- every reward model's weights, the training reward's and each judge's, can be found offline;
- every training and evaluation prompt has a non-empty contrastive set in each source that a
  TextNorm column needs, the error naming the prompt and the source;
- a reward whose ensemble kind depends on the TIA2 set finds every prompt's set.
"""
from __future__ import annotations

from collections.abc import Sequence

from tn_ray import provenance
from tn_ray.diffusion.pipelines import check_source, pipeline_revisions
from tn_ray.rewards.availability import check_weights
from tn_ray.rewards.revisions import reward_revisions
from tn_ray.storage import check_output_dir
from tn_ray.training.config import FineTuneConfig
from tn_ray.training.evaluation import eval_prompts, reward_groups, reward_texts


def check_run(cfg: FineTuneConfig, prompts: Sequence[str]) -> list[list[str]]:
    """Raise the first user error of ``cfg`` (a :class:`tn_ray.errors.TnRayError`); returns the
    training reward's ``[x0, x1..xm]`` per training prompt (:func:`reward_texts`)."""

    check_output_dir(cfg.out)
    check_source(cfg.policy.pipeline, cfg.policy.revision)
    check_weights(list(dict.fromkeys([*cfg.reward.models, *(m for j in cfg.eval.judges for m in j.models)])))
    texts = reward_texts(cfg.reward, prompts)
    reward_groups(cfg.reward, prompts)
    if cfg.eval.enabled:
        evaluated = eval_prompts(cfg, prompts)
        for judge in [cfg.reward, *cfg.eval.judges]:
            reward_texts(judge, evaluated)
            reward_groups(judge, evaluated)
    return texts


def record_provenance(cfg: FineTuneConfig, allow_change: bool = False) -> None:
    """``provenance.json`` of the run folder (:func:`tn_ray.provenance.record`), after the checks and
    before Ray starts: the training reward's and judges' models, the base pipeline at its revision."""

    models = [*cfg.reward.models, *(m for j in cfg.eval.judges for m in j.models)]
    provenance.record(cfg.out, cfg, allow_change=allow_change,
                      revisions={**pipeline_revisions([(cfg.policy.pipeline, cfg.policy.revision)]),
                                 **reward_revisions(models)})
