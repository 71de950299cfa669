"""Reward learning from binary human feedback (Lee et al. 2023): labels -> reward.

``data`` (TIA2-format label files, contrastive prompts, split by prompt), ``features``
(frozen backbone embeddings computed once by the reward actors, cached as Parquet), ``head``
(MLP over image, text and their product), ``losses`` (label loss + prompt classification),
``train`` (epoch loop under Ray Train / Tune), ``report`` + ``calibration`` (held-out metrics,
ECE, reliability diagram), ``pipeline`` (``tn-ray reward train``), ``sweep`` (``reward_head``).
The trained head is the reward model ``learned:<folder>`` (:mod:`tn_ray.rewards.learned`).
"""
