"""A synthetic world with exact ground truth: scenes of coloured shapes, prompts about them, an
oracle that decides every (scene, prompt) pair, a sampler with known error rates, and label
files in TIA2's layout. See docs/world.md."""
