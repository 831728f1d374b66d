"""Which files are images: the suffixes every command that reads a folder of images accepts.

A module of its own, without torch or open_clip, so that the rating page
(`plural_diffusion.web`) lists a folder as the feature extractor does without importing it."""

from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def has_image_suffix(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES
