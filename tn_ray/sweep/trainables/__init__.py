"""The sweep's trainables, one module each, registered by name in :mod:`tn_ray.sweep.registry`:
``evaluators`` (``tia2_textnorm``, ``bestofn_selection``), ``toy`` (``toy_regression``), ``rwr``,
``ddpo``, ``grpo`` and ``reward_head``. They are the only place where Ray Tune meets training code:
:mod:`tn_ray.training` knows nothing about Tune."""
