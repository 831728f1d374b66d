"""plural-diffusion: RL fine-tuning of text-to-image diffusion models toward plural taste."""

__version__ = "0.1.0"
