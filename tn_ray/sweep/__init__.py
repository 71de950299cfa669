"""Sweeps with Ray Tune + Optuna: TextNorm settings on stored score matrices, and training
runs (KL coefficient) through trainables registered by name. See :mod:`.runner`."""
from tn_ray.sweep.config import SweepConfig
from tn_ray.sweep.registry import available, get, register
from tn_ray.sweep.runner import check, load, load_and_run, run_sweep
from tn_ray.sweep.trainable import SweepTrainable

__all__ = [
    "SweepConfig",
    "SweepTrainable",
    "available",
    "check",
    "get",
    "load",
    "load_and_run",
    "register",
    "run_sweep",
]
