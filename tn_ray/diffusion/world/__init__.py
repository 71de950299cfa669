"""The ``world`` text-to-image pipeline: a small Stable Diffusion trained on the synthetic world.

Same classes as Stable Diffusion 2.1 (``UNet2DConditionModel``, ``AutoencoderKL``,
``CLIPTextModel`` + ``CLIPTokenizer``, a DDIM scheduler), trained by ``tn-ray world
train-generator`` on (render, caption) pairs of ``tn_ray.data.world``; its weights ship with the
package (``weights/``) and load with plain ``diffusers.StableDiffusionPipeline.from_pretrained``.
See docs/world.md ("The world generator").
"""
