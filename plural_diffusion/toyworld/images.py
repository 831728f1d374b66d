"""Procedural toy images from attributes, each with a caption made from those attributes.

An image is a background and 1-3 shapes. Its attributes (brightness, hue, saturation, shape kind
and count, texture) are sampled independently, rendered with pure torch, and the caption names
them in words, so a text-conditioned model can be asked for "a dark ..." or "a vivid ...".
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass

import torch

SHAPES = ("circle", "square", "triangle")
TEXTURES = ("plain", "striped", "speckled")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class ImageAttributes:
    brightness: float  # target mean value of the image, 0 (black) .. 1 (white)
    hue: float  # 0..1 on the colour wheel; 0 red, 0.1 orange, 0.6 blue
    saturation: float  # 0 (grey) .. 1 (pure colour)
    shape: str
    count: int
    texture: str

    def as_dict(self) -> dict:
        return asdict(self)


def brightness_word(b: float) -> str:
    return "dark" if b < 0.35 else ("bright" if b > 0.65 else "medium")


def saturation_word(s: float) -> str:
    return "grey" if s < 0.25 else ("vivid" if s > 0.65 else "muted")


def warmth_word(h: float) -> str:
    # warm: red/orange/yellow (and magenta wrapping to red); cool: green/cyan/blue
    return "warm" if (h < 0.17 or h > 0.92) else ("cool" if 0.3 < h < 0.75 else "neutral")


def caption(a: ImageAttributes) -> str:
    """'a dark vivid warm image of two striped circles' (singular for one shape)."""
    shape = a.shape if a.count == 1 else a.shape + "s"
    texture = "" if a.texture == "plain" else a.texture + " "
    colour = saturation_word(a.saturation)
    if colour != "grey":
        colour = f"{colour} {warmth_word(a.hue)}"
    return (
        f"a {brightness_word(a.brightness)} {colour} image of "
        f"{COUNT_WORDS[a.count]} {texture}{shape}"
    )


def sample_attributes(n: int, generator: torch.Generator) -> list[ImageAttributes]:
    """`n` attribute sets, each attribute drawn uniformly and independently."""
    u = torch.rand(n, 3, generator=generator).tolist()
    shape = torch.randint(len(SHAPES), (n,), generator=generator).tolist()
    count = torch.randint(1, 4, (n,), generator=generator).tolist()
    texture = torch.randint(len(TEXTURES), (n,), generator=generator).tolist()
    return [
        ImageAttributes(
            brightness=0.05 + 0.9 * u[i][0],
            hue=u[i][1],
            saturation=u[i][2],
            shape=SHAPES[shape[i]],
            count=count[i],
            texture=TEXTURES[texture[i]],
        )
        for i in range(n)
    ]


def _rgb(hue: float, saturation: float, value: float) -> torch.Tensor:
    return torch.tensor(colorsys.hsv_to_rgb(hue % 1.0, saturation, min(max(value, 0.0), 1.0)))


def _shape_mask(kind: str, cx: float, cy: float, r: float, yy: torch.Tensor, xx: torch.Tensor):
    if kind == "circle":
        return ((xx - cx) ** 2 + (yy - cy) ** 2) <= r**2
    if kind == "square":
        return ((xx - cx).abs() <= r * 0.85) & ((yy - cy).abs() <= r * 0.85)
    assert kind == "triangle", kind
    # upward triangle: inside when below the two slanted edges and above the base
    top, base = cy - r, cy + r * 0.8
    half_width = (yy - top) / (base - top) * r
    return (yy >= top) & (yy <= base) & ((xx - cx).abs() <= half_width)


def render(a: ImageAttributes, size: int, generator: torch.Generator) -> torch.Tensor:
    """One image as float [3, size, size] in [0, 1]; shape positions and speckle use `generator`."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    # Background slightly darker and shapes slightly lighter than the target brightness, so the
    # mean value stays near `brightness` while shapes remain visible at every level.
    contrast = 0.18
    bg = _rgb(a.hue, a.saturation, a.brightness - contrast * 0.5)
    fg = _rgb(a.hue + 0.08, a.saturation, a.brightness + contrast)
    img = bg.view(3, 1, 1).expand(3, size, size).clone()
    pos = torch.rand(a.count, 2, generator=generator) * 0.5 + 0.25
    radius = 0.22 if a.count == 1 else 0.15
    for cx, cy in pos.tolist():
        mask = _shape_mask(a.shape, cx, cy, radius, yy, xx)
        img[:, mask] = fg.view(3, 1)
    if a.texture == "striped":
        img = img * (1.0 + 0.25 * torch.sign(torch.sin(yy * size * math.pi / 2.0)))
    elif a.texture == "speckled":
        img = img * (1.0 + 0.3 * (torch.rand(size, size, generator=generator) - 0.5))
    return img.clamp(0.0, 1.0)


@dataclass
class ToyImageSet:
    images: torch.Tensor  # [N, 3, H, W] float in [0, 1]
    captions: list[str]
    attributes: list[ImageAttributes]

    def __len__(self) -> int:
        return len(self.captions)


def make_images(n: int, size: int = 32, seed: int = 0) -> ToyImageSet:
    """`n` toy images with captions, the same for the same (n, size, seed)."""
    g = torch.Generator().manual_seed(seed)
    attrs = sample_attributes(n, g)
    images = torch.stack([render(a, size, g) for a in attrs])
    return ToyImageSet(images=images, captions=[caption(a) for a in attrs], attributes=attrs)
