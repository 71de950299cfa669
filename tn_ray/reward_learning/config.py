"""The ``tn-ray reward train`` YAML: labelled data, backbone, head, losses, training, report.

```yaml
out: results/reward/shapes
backbone: clip:tiny                     # any registered dual-encoder reward
data:
  sets:
    counting: {labels: data/tia2/human_annotations/human_labels_counting.json, images: data/images/counting}
  contrast: data/tia2/prompts/prompt_set_{set}.json   # or released, rules, llm
  split: {val: 0.2, test: 0.2, seed: 0}
head: {hidden: 128, layers: 2, dropout: 0.1}
loss: {kind: mse, target: binary, aux_weight: 0.5, temperature: 1.0}
train: {epochs: 60, batch_size: 64, lr: 0.001, patience: 10}
```

Cross-field checks run when the file loads, so a bad config fails before Ray starts.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tn_ray.config import OutputLocation, RayConfig, ScoringConfig, StrictModel
from tn_ray.rewards import parse
from tn_ray.training.config import LoggingBlock, ScalingBlock

# registered rewards known to score (image, text) jointly; any other non-dual encoder is refused
# when its features are first computed (tn_ray.rewards.base.as_embeddings)
CROSS_ENCODERS = ("imagereward", "blip2-itm")


class SetSource(StrictModel):
    labels: str = Field(..., description="label file in the TIA2 format {image: {image, caption, human_labels}} (local "
                                         "path)")
    images: str = Field(..., description="folder (local or cloud URI) holding the label file's image names")


class SplitBlock(StrictModel):
    val: float = Field(0.2, ge=0, lt=1, description="fraction of each set's prompts held out for validation (early "
                                                    "stopping)")
    test: float = Field(0.2, ge=0, lt=1, description="fraction of each set's prompts held out for the final report")
    seed: int = Field(0, description="seed of the prompt shuffle; the split is by prompt, never by image")

    @model_validator(mode="after")
    def _room(self) -> SplitBlock:
        if self.val + self.test >= 1:
            raise ValueError(f"val + test = {self.val + self.test} leaves no training prompts (must be < 1)")
        return self


class DataBlock(StrictModel):
    sets: dict[str, SetSource] = Field(..., min_length=1, description="set name -> its label file and image folder; "
                                                                      "the split is stratified by set")
    contrast: str = Field(..., description="contrastive prompts of the auxiliary loss and TextNorm: a prompt source "
                                           "('rules', 'llm'), 'released[:<TIA2 set>]' or a JSON file {x0: [x1..xm]} "
                                           "({set} expands to the set name)")
    tia2_dir: str | None = Field(None, description="local copy of the TIA2 prompt sets for contrast='released...'; "
                                                   "None = $TN_RAY_TIA2_DIR or download")
    max_contrast: int | None = Field(None, ge=1, description="use at most the first N contrastive prompts per prompt "
                                                             "(count); None = all")
    split: SplitBlock = Field(default_factory=SplitBlock, description="train / validation / test split by prompt")


class HeadBlock(StrictModel):
    hidden: int = Field(128, ge=1, description="width of each hidden layer of the MLP (units)")
    layers: int = Field(2, ge=1, description="hidden layers of the MLP over [image, text, image * text] (count)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout after each hidden layer during training (probability)")


class LossBlock(StrictModel):
    kind: Literal["mse", "bce"] = Field("mse", description="label loss: mse of the reward against the label (Lee et "
                                                           "al.) or bce of sigmoid(reward)")
    target: Literal["binary", "fine"] = Field("binary", description="label: binary (good if >= 2 of 3 annotators said "
                                                                    "so) or fine (mean label, inconclusive = 0.5)")
    aux_weight: float = Field(0.5, ge=0, description="weight of the prompt-classification loss relative to the label "
                                                     "loss (0 = off)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the prompt-classification loss (reward "
                                                      "units)")


class TrainBlock(StrictModel):
    epochs: int = Field(60, ge=1, description="most passes over the training images (count)")
    batch_size: int = Field(64, ge=1, description="images per optimizer step, summed over workers (images)")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (per step)")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW decoupled weight decay (per step, times lr)")
    patience: int = Field(10, ge=1, description="stop when the validation AUROC has not improved for this many epochs "
                                                "(count)")
    seed: int = Field(0, description="seed of the head's initialisation, dropout and batch order")
    checkpoint_every: int = Field(10, ge=1, description="checkpoint every N epochs (count); also after every epoch "
                                                        "that improves the validation AUROC, and the last")


class ReportBlock(StrictModel):
    compare_without_aux: bool = Field(True, description="when loss.aux_weight > 0, also train the same head with "
                                                        "aux_weight 0 and report both (ablation)")
    tau: float = Field(1.0, gt=0, description="TextNorm temperature of the reported textnorm(...) columns (reward "
                                              "units)")
    bins: int = Field(10, ge=2, description="equal-width probability bins of the reliability diagram and the ECE "
                                            "(count)")


class RewardTrainConfig(StrictModel):
    out: OutputLocation = Field("results/reward", description="run folder (local): model, metrics, plots, Ray Train "
                                                              "checkpoints")
    backbone: str = Field("clip", description="frozen dual-encoder reward whose embeddings the head reads, e.g. clip, "
                                              "clip:tiny, pickscore:/path")
    feature_cache: str | None = Field(None, description="feature cache folder or cloud URI, keyed by image and text; "
                                                        "None = <out>/features")
    data: DataBlock = Field(..., description="labelled images, contrastive prompts and the split")
    head: HeadBlock = Field(default_factory=HeadBlock, description="the MLP head")
    loss: LossBlock = Field(default_factory=LossBlock, description="label loss and prompt-classification loss")
    train: TrainBlock = Field(default_factory=TrainBlock, description="optimizer, epochs, early stopping")
    report: ReportBlock = Field(default_factory=ReportBlock, description="held-out metrics, TextNorm columns, "
                                                                         "calibration")
    logging: LoggingBlock = Field(default_factory=lambda: LoggingBlock(progress_bar=False), description="TensorBoard, "
                                                                                                        "W&B (per "
                                                                                                        "epoch)")
    scaling: ScalingBlock = Field(default_factory=ScalingBlock, description="Ray Train workers and resources")
    scoring: ScoringConfig = Field(default_factory=ScoringConfig, description="reward actors that compute the frozen "
                                                                              "features")
    ray: RayConfig = Field(default_factory=RayConfig, description="where Ray runs")

    @field_validator("backbone")
    @classmethod
    def _backbone(cls, value: str) -> str:
        spec = parse(value)
        if spec.name == "learned":
            raise ValueError("a learned reward cannot be the backbone of another head; name its backbone instead")
        if spec.name in CROSS_ENCODERS:
            raise ValueError(f"'{spec}' is a cross-encoder (its text features are tokens, not an embedding); "
                             "use a dual encoder such as clip or pickscore")
        return str(spec)
