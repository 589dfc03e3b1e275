"""Fast text path vs open_clip's encode_text, side by side in one process.

Reference: open_clip ``encode_text`` on all C class prompts of each candidate,
padded to 77 tokens, one candidate after another (contexts written into the
token embeddings by a hook). vlmlab: the prefix-sharing population path.
Random-init ViT-B-32, fp32, nothing downloaded.

    .venv/bin/python benchmarks/oracle_text_path.py [--repeats 3] [--device cpu]

Last line: ``speedup_c10=<x> speedup_c100=<y> max_abs_diff=<z>``.
"""

from __future__ import annotations

import argparse
import time

import torch

from vlmlab.oracle import OpenClipOracle

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# CIFAR-100 fine labels in label order, underscores as spaces (as prompts use them).
CIFAR100 = [
    name.replace("_", " ")
    for name in [
        "apple",
        "aquarium_fish",
        "baby",
        "bear",
        "beaver",
        "bed",
        "bee",
        "beetle",
        "bicycle",
        "bottle",
        "bowl",
        "boy",
        "bridge",
        "bus",
        "butterfly",
        "camel",
        "can",
        "castle",
        "caterpillar",
        "cattle",
        "chair",
        "chimpanzee",
        "clock",
        "cloud",
        "cockroach",
        "couch",
        "crab",
        "crocodile",
        "cup",
        "dinosaur",
        "dolphin",
        "elephant",
        "flatfish",
        "forest",
        "fox",
        "girl",
        "hamster",
        "house",
        "kangaroo",
        "keyboard",
        "lamp",
        "lawn_mower",
        "leopard",
        "lion",
        "lizard",
        "lobster",
        "man",
        "maple_tree",
        "motorcycle",
        "mountain",
        "mouse",
        "mushroom",
        "oak_tree",
        "orange",
        "orchid",
        "otter",
        "palm_tree",
        "pear",
        "pickup_truck",
        "pine_tree",
        "plain",
        "plate",
        "poppy",
        "porcupine",
        "possum",
        "rabbit",
        "raccoon",
        "ray",
        "road",
        "rocket",
        "rose",
        "sea",
        "seal",
        "shark",
        "shrew",
        "skunk",
        "skyscraper",
        "snail",
        "snake",
        "spider",
        "squirrel",
        "streetcar",
        "sunflower",
        "sweet_pepper",
        "table",
        "tank",
        "telephone",
        "television",
        "tiger",
        "tractor",
        "train",
        "trout",
        "tulip",
        "turtle",
        "wardrobe",
        "whale",
        "willow_tree",
        "wolf",
        "woman",
        "worm",
    ]
]
assert len(CIFAR10) == 10 and len(CIFAR100) == 100


def _time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    result = fn()  # warm-up (allocator, kernels)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def run_case(
    oracle: OpenClipOracle, names: list[str], population: int, n_context: int, repeats: int
):
    meta = oracle.metadata
    generator = torch.Generator().manual_seed(0)
    contexts = meta.embedding_mean + meta.embedding_std * torch.randn(
        population, n_context, meta.token_dim, generator=generator
    )
    contexts = contexts.to(oracle.device)

    def fast():
        return oracle.text_features(contexts, names, prefix_sharing=True)

    def reference():
        return oracle.text_features(contexts, names, prefix_sharing=False)

    t_ref, ref = _time(reference, repeats)
    t_fast, out = _time(fast, repeats)
    diff = float((out.float().cpu() - ref.float().cpu()).abs().max())
    return t_ref, t_fast, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    oracle = OpenClipOracle("ViT-B-32", device=args.device, disk_cache=False)
    device = str(oracle.device)
    if device.startswith("cuda"):
        device += f" ({torch.cuda.get_device_name()})"
    print(
        f"backend=open_clip model=ViT-B-32/random-init fp32 device={device} threads={torch.get_num_threads()}"
    )
    results = {}
    for label, names, population, n_context in (
        ("c10", CIFAR10, 20, 4),
        ("c100", CIFAR100, 4, 16),
    ):
        t_ref, t_fast, diff = run_case(oracle, names, population, n_context, args.repeats)
        results[label] = (t_ref / t_fast, diff)
        print(
            f"{label}: P={population} C={len(names)} m={n_context} "
            f"encode_text={t_ref * 1e3:.1f}ms vlmlab={t_fast * 1e3:.1f}ms "
            f"speedup={t_ref / t_fast:.2f}x max_abs_diff={diff:.2e}"
        )
    max_diff = max(diff for _, diff in results.values())
    print(
        f"speedup_c10={results['c10'][0]:.2f} speedup_c100={results['c100'][0]:.2f} "
        f"max_abs_diff={max_diff:.2e}"
    )


if __name__ == "__main__":
    main()
