"""Peak memory of one population's text pass at ImageNet scale: C = 1,000, P = 20, m = 16.

The prefix-sharing encoder packs a candidate's classes into sequences of at
most ``max_tokens_per_chunk`` tokens (8,192 by default; 1,000 ImageNet-like
class names make about 4,500 suffix tokens) and runs candidates in chunks that
fit it, so activation memory is set by that bound, not by P or C. This script
measures the peak of one population's ``text_features`` on a random-init
ViT-B-16 (``--model``) for each bound in ``--bounds``:

- on CUDA: ``torch.cuda.max_memory_allocated`` above the weights;
- on CPU: the process's peak resident memory above what it held before the
  pass (allocator caching included, so an upper bound). CPU defaults to P = 2:
  a chunk holds one candidate at these bounds either way, so the peak is the
  same as at P = 20, at a tenth of the time (``--population 20`` to check).

    .venv/bin/python benchmarks/oracle_memory.py [--device cuda] [--population 20]

Last line: ``name=value`` pairs (MiB).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch

from vlmlab.oracle import OpenClipOracle


def class_names(count: int) -> list[str]:
    """``count`` distinct multi-word names, about as long in tokens as ImageNet's."""
    words = ["red", "small", "striped", "wild", "northern", "giant", "spotted", "common",
             "grey", "crested", "american", "european"]  # fmt: skip
    things = ["fox", "warbler", "beetle", "terrier", "mushroom", "sports car", "teapot",
              "lizard", "snake", "moth"]  # fmt: skip
    names = [f"{a} {b} {c}" for a in words for b in words if a != b for c in things]
    if len(names) < count:
        raise ValueError(f"at most {len(names)} names, asked for {count}")
    return names[:count]


def measure(model: str, device: str, population: int, bound: int) -> tuple[float, float]:
    """(peak MiB above the start, seconds) of one population's text pass."""
    oracle = OpenClipOracle(model, device=device, disk_cache=False, max_tokens_per_chunk=bound)
    names = class_names(1000)
    meta = oracle.metadata
    generator = torch.Generator().manual_seed(0)
    contexts = meta.embedding_mean + meta.embedding_std * torch.randn(
        population, 16, meta.token_dim, generator=generator
    )
    oracle.check_class_names(names, n_context=16)  # tokenized before: the pass is measured
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    features = oracle.text_features(contexts.to(oracle.device), names)
    assert features.shape[:2] == (population, 1000)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return peak / 2**20, time.perf_counter() - started


def main() -> None:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    population = args.population or (20 if device.startswith("cuda") else 2)
    print(
        f"backend=open_clip model={args.model}/random-init fp32 device={device} C=1000 m=16 P={population}"
    )
    if args.child:  # one bound, in this fresh process
        peak, seconds = measure(args.model, device, population, args.bounds[0])
        print(f"{peak:.1f} {seconds:.2f}")
        return
    figures = {}
    for bound in args.bounds:
        # A fresh process per bound: a CPU peak is a high-water mark of the process.
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--device", device, "--model", args.model,
             "--population", str(population), "--bounds", str(bound)],
            check=True, capture_output=True, text=True,
        ).stdout.split("\n")[-2]  # fmt: skip
        peak, seconds = (float(v) for v in out.split())
        print(
            f"max_tokens_per_chunk={bound:6d}: peak {peak:8.1f} MiB above the start, {seconds:.1f} s"
        )
        figures[f"peak_mib_{bound}"] = peak
    print(" ".join(f"{k}={v:.1f}" for k, v in figures.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--population", type=int, default=None)
    parser.add_argument("--bounds", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    main()
