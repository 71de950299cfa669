"""Fine-tuning text-to-image diffusion with a reward: the shared core and its methods.

Core (shared by RWR and DDPO): ``config`` (typed blocks), ``policy`` (pipeline + LoRA, the
base model as the same UNet with adapters disabled), ``optim`` (AdamW, schedule, clipping,
mixed precision), ``checkpoint`` (LoRA + optimizer + RNG + position; exact resume),
``loop`` (Ray Train ``TorchTrainer`` around a method object with ``step()``),
``evaluation`` (fixed prompts and seeds, base images cached, scored on reward actors),
``selection`` (the paper's checkpoint rule), ``monitor`` (overoptimization), ``logging``
(TensorBoard, W&B), ``outputs`` (curves, grids, human-evaluation export).
Methods: ``rwr`` (reward-weighted regression, eq. 4), ``ddpo`` (policy gradient, eq. 5).
"""
