"""Inference: the image-to-image CODSR pipeline, tiling and colour correction."""
