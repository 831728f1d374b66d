"""The toy taste world: procedural images, gold raters with known utilities, tiny base models."""
