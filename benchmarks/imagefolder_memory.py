"""Peak memory of a 20,000-photo ``imagefolder``: lazy (decoded batch by batch) vs whole.

A flat folder of JPEGs (``--classes`` x ``--per-class``, small gradient-and-
noise pictures of ``--side`` px, written once with PIL and reused from
``--folder``) is split here (train 60 %, test 40 % of each class) and, in a
fresh child process each:

- ``lazy``: both splits loaded and registered with an in-process oracle (the
  ``latency`` backend: no model, its image encoder is a per-image mean, so
  the numbers are the data path's) with an empty feature cache: every image
  is decoded at 224 x 224 and encoded, one batch at a time;
- ``hit``: the same again in a new process on the filled cache: the sets are
  named by their files' digest and their features read back, nothing decoded;
- ``whole``: the old path: each split's images in one array
  (``np.asarray(dataset.images)``), then registered.

Each child reads its resident memory after its imports and resets the peak
(``/proc/self/clear_refs``), so "peak above start" is what the data and the
oracle cost. Goal: the lazy path within 1 GiB of its start.

    .venv/bin/python benchmarks/imagefolder_memory.py [--folder /tmp/vlmlab-imagefolder-bench]

Last line: ``name=value`` pairs (MiB, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_folder(folder: Path, classes: int, per_class: int, side: int) -> int:
    """Write the JPEGs unless the folder has them already; how many there are."""
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, side, dtype=np.float32)
    written = 0
    for c in range(classes):
        target = folder / f"class_{c:02d}"
        target.mkdir(parents=True, exist_ok=True)
        have = {p.name for p in target.glob("*.jpg")}
        base = rng.integers(0, 256, 3).astype(np.float32)
        for i in range(per_class):
            name = f"{i:05d}.jpg"
            if name in have:
                continue
            width = side + int(rng.integers(0, side // 2))  # not square: the crop works
            gradient = np.outer(ramp, np.linspace(0, 1, width, dtype=np.float32))
            noise = rng.normal(0, 20, (side, width, 3))
            pixels = base * (0.4 + 0.6 * gradient[..., None]) + noise
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            image.save(target / name, quality=85)
            written += 1
    count = sum(1 for _ in folder.glob("*/*.jpg"))
    print(f"folder={folder} images={count} written_now={written}", flush=True)
    return count


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(mode: str, folder: Path, cache: Path) -> dict[str, float]:
    """One measurement in this (fresh) process."""
    os.environ["VLMLAB_CACHE_DIR"] = str(cache)
    from vlmlab.data import load_dataset
    from vlmlab.oracle import ImageSet, create_oracle

    oracle = create_oracle("latency:0", disk_cache=mode != "whole")
    import PIL.JpegImagePlugin  # noqa: F401  (imported before the start is read)

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    start = _rss_kib("VmRSS")
    started = time.perf_counter()
    encoded, held = 0, []  # a run holds both splits, as a trial holds train and test
    for split in ("train", "test"):
        dataset = load_dataset("imagefolder", split, root=folder)
        images = dataset.image_set()
        if mode == "whole":
            images = ImageSet(np.asarray(dataset.images), images.meta)
        ref = oracle.register_images(images)
        encoded += len(oracle.image_features(ref))
        held.append(images)
    seconds = time.perf_counter() - started
    peak = _rss_kib("VmHWM")
    return {"peak_mib": (peak - start) / 1024, "seconds": seconds, "images": encoded}


def run_child(mode: str, folder: Path, cache: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--folder", str(folder), "--cache", str(cache)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    print(
        f"{mode:>5}: {result['images']:.0f} images, peak {result['peak_mib']:,.0f} MiB above "
        f"start, {result['seconds']:.1f} s",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--folder", type=Path, default=Path(tempfile.gettempdir()) / "vlmlab-imagefolder-bench"
    )
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=2000)
    parser.add_argument("--side", type=int, default=96, help="JPEG height in pixels")
    parser.add_argument("--child", choices=("lazy", "hit", "whole"))
    parser.add_argument("--cache", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.cache)))
        return
    count = make_folder(args.folder, args.classes, args.per_class, args.side)
    with tempfile.TemporaryDirectory(prefix="vlmlab-bench-cache-") as cache:
        os.environ["VLMLAB_DATA_DIR"] = str(Path(cache) / "data")  # the split manifests
        lazy = run_child("lazy", args.folder, Path(cache))
        hit = run_child("hit", args.folder, Path(cache))
        whole = run_child("whole", args.folder, Path(cache))
    ratio = whole["peak_mib"] / max(lazy["peak_mib"], 1e-9)
    print(
        f"images={count} lazy_peak_mib={lazy['peak_mib']:.0f} lazy_s={lazy['seconds']:.1f} "
        f"hit_peak_mib={hit['peak_mib']:.0f} hit_s={hit['seconds']:.1f} "
        f"whole_peak_mib={whole['peak_mib']:.0f} whole_s={whole['seconds']:.1f} "
        f"whole_over_lazy={ratio:.1f}"
    )


if __name__ == "__main__":
    main()
