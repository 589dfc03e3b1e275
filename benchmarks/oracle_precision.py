"""Reduced precision against fp32: how far fp16 and bf16 logits move, per architecture.

For each model (random init, seed 0: the same weights at every precision) and
each of fp16 and bf16, both towers run in that precision; the logits of a
population (P = 20 candidates, C = 10 classes, m = 4 contexts) on 16 random
images are compared with fp32's: the largest absolute logit difference, the
same relative to the logits' spread, and how often the predicted class
(argmax over classes, per candidate and image) agrees. Image features are
computed (and cached) in each precision: the cache keys name it.

    .venv/bin/python benchmarks/oracle_precision.py [--device cuda] [--models ViT-B-16 RN50]

On CPU fp16 runs through torch's CPU kernels (slow, and not what a GPU does);
the figures that matter for serving are the CUDA ones. Last line: ``name=value``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle_text_path import CIFAR10

from vlmlab.oracle import ImageSet, OpenClipOracle


def _logits(model: str, precision: str, device: str, pixels: np.ndarray) -> torch.Tensor:
    oracle = OpenClipOracle(model, device=device, precision=precision, disk_cache=False)
    ref = oracle.register_images(ImageSet(pixels, {"dataset": "noise-precision"}))
    meta = oracle.metadata
    generator = torch.Generator().manual_seed(0)
    contexts = meta.embedding_mean + meta.embedding_std * torch.randn(
        20, 4, meta.token_dim, generator=generator
    )
    return oracle.logits(contexts, CIFAR10, ref).float()


def main() -> None:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(f"backend=open_clip random-init device={device} ({card}) P=20 C=10 m=4 images=16")
    pixels = np.random.default_rng(0).integers(0, 256, (16, 224, 224, 3), dtype=np.uint8)
    figures: dict[str, float] = {}
    for model in args.models:
        reference = _logits(model, "fp32", device, pixels)
        spread = float(reference.std())
        for precision in args.precisions:
            low = _logits(model, precision, device, pixels)
            diff = float((low - reference).abs().max())
            agree = float((low.argmax(-1) == reference.argmax(-1)).float().mean())
            print(
                f"{model:10s} {precision}: max |logit diff| {diff:.4f} "
                f"({diff / spread:.3f} of the logits' std {spread:.3f}), argmax agreement "
                f"{agree * 100:.1f}%"
            )
            tag = f"{model.replace('-', '').lower()}_{precision}"
            figures[f"maxdiff_{tag}"] = diff
            figures[f"agree_{tag}"] = agree
    print(" ".join(f"{name}={value:.4f}" for name, value in figures.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--models", nargs="+", default=["ViT-B-16", "RN50"])
    parser.add_argument("--precisions", nargs="+", default=["fp16", "bf16"])
    args = parser.parse_args()
    main()
