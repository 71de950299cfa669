"""``tn-ray study CONFIG``: the paper's experiment grid from one YAML: rewards x methods (best-of-n over an n list;
RWR, DDPO, GRPO over a KL grid) x seeds, every result judged by one truth column, and one report (docs/study.md).

A study (:class:`~tn_ray.experiments.study.config.StudyConfig`) names methods (each a base YAML; a fine-tuning
method with the dotted key of its KL coefficient and a KL grid, best-of-n with its n list), training / selection
rewards (rows, each a :class:`~tn_ray.textnorm.columns.RewardConfig` block), seeds, a truth column (a reward model
spec, e.g. ``worldjudge`` on the world, a held-out judge elsewhere) and overrides. ``tn-ray world finetune`` is this
package on a grid of fine-tuning methods only (sweeps/world_finetune*.yaml): one implementation of the grid.

Runs (the units that execute; ``plan.plan``):

- a fine-tuning cell is method x reward x kl x seed; its config is the method's YAML + ``overrides`` + the
  method's ``overrides`` + ``{reward: <row>, <kl_key>: kl, seed: s, out: <out>/cells/<cell id>}``, with the truth
  added to ``eval.judges`` as a held-out judge unless the row trains on it (then the training reward's column is
  the truth's); an RWR cell also gets ``generation.out: <out>/shared/<method>-generation-seed<g>-<tag>`` and
  ``cache_dir: <out>/shared/rwr-cache`` (unless set), so RWR cells whose base-model images are the same (same
  generation block, prompts and pipeline: ``plan.generation_tag``; the reward, KL and cell seed do not enter)
  share one generation and one reward cache; every fine-tuning cell gets ``eval.base_images:
  <out>/shared/eval-base`` (unless set), so cells whose base-model evaluation images are the same (same policy
  without LoRA, evaluation prompts, seeds and sampling: ``training.evaluation.base_images_tag``) generate them once;
- a best-of-n run is one per (best-of-n entry, seed): its cells (reward x n) share one generation. Its config is
  the entry's YAML + the entry's ``overrides`` + ``{models: every row's models and the truth, ensembles: every
  row's, pools: n, top_k: [1], generation.seed: s, out: <out>/cells/<entry>-s<seed>, cache_dir: <out>/cache,
  human_eval: null}`` (the grid's ``overrides`` are the fine-tuning cells' only).

Every run's config is validated, and every unfinished run passes its preflight, before Ray starts. The unfinished
runs go as the trials of one Ray Tune experiment (``tune_runs``; a trial per run, in plan order, seed-major; the
methods' ``run`` functions start Ray only when it is not up). A run that returned gets ``done.json`` and is skipped
by ``--resume``; an unfinished one is entered again and resumes from its own checkpoints / generation cache.
``cost.counts`` counts each run's sampled image-steps, trained image-steps and reward scores, a shared RWR
generation (and its cached scores) once, and ``cost.estimate`` prices them with the study's ``cost`` block
(``--dry-run``). The report (``report.write_report``) joins :mod:`tn_ray.analysis.finetune_report` (fine-tuning
cells) and :mod:`tn_ray.analysis.study_report` (best-of-n cells).

The modules, in the order a study goes through them (each imports only those above it):

- ``config``: the YAML as ``StudyConfig`` (validated), the per-method rules, ``load_study``;
- ``cell_keys``: the grid's cells and runs as keys (ids, folders, columns; no config read);
- ``plan``: every run with its validated config; RWR cells of a seed share one generation;
- ``cost``: each run's counted work and its estimated seconds;
- ``state``: a run's ``done.json`` and its state (done, partial, new);
- ``dry_run``: the lines of ``--dry-run``;
- ``run_tables``: the tables the report reads from a finished run;
- ``paper_sections``: win / tie / loss, the human raters' tallies, gains per sample and per device-hour;
- ``figures``: the image figures (the paper's Fig. 4 and 5) and report.html;
- ``report``: the report of the finished runs;
- ``tune_runs``: the unfinished runs as one Tune experiment, a trial per run;
- ``runner``: preflight, the Tune experiment, then the report.
"""
