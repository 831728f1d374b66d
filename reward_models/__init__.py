"""reward_models: rater-aware aesthetic reward heads on CLIP features.

Never imports `plural_diffusion`: the trainer talks to rewards through `score(features, z)`.
"""

__version__ = "0.1.0"
