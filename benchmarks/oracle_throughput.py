"""Oracle throughput when many trials share one replica: queries/s, side by side in one run.

(a) reference: a loop in the style of the official BBF code: open_clip's
    ``encode_text`` on the C padded prompts of each candidate, one candidate
    after another, image features cached (in this process; no pool);
(b) vlmlab, one trial: one client sending one population a generation to a
    one-replica Serve pool (prefix-sharing text path);
(c) vlmlab, 8 concurrent trials on that one replica, each request computed
    alone ("unbatched") or with the others' (``batching={"max_requests": 8}``).

Random-init ViT-B-16 (``--model``), nothing downloaded. Cases: C = 100, m = 16,
P = 20 (BBF's CIFAR-100 setting) and C = 10, m = 4, P = 20; each request
scores ``--images`` images. On CUDA: fp16 (``--precision``), 10 generations a
trial. On CPU the same cases with fewer generations, and the reference timed on
``--reference-population`` candidates (its cost is linear in P, so its
queries/s is the same), so that the whole run stays within minutes.

    .venv/bin/python benchmarks/oracle_throughput.py [--device cpu] [--generations 3]

Last line: ``name=value`` pairs (queries/s and ratios per case).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle_text_path import CIFAR10, CIFAR100

from vlmlab.oracle import ImageSet, OpenClipOracle

TRIALS = 8


def _contexts(meta, population: int, n_context: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(population, n_context, meta.token_dim, generator=generator)
    return meta.embedding_mean + meta.embedding_std * noise


def reference_qps(
    oracle: OpenClipOracle, names, population: int, n_context: int, ref, repeats: int
) -> float:
    """Official-style loop: encode_text per candidate on padded prompts, then score."""
    image = oracle.image_features(ref).to(oracle.device)

    def one_population(seed: int) -> None:
        contexts = _contexts(oracle.metadata, population, n_context, seed).to(oracle.device)
        text = oracle.text_features(contexts, names, prefix_sharing=False)
        text = torch.nn.functional.normalize(text.float(), dim=-1)
        scores = torch.einsum("ne,pce->pnc", image, text) * oracle.logit_scale
        scores.cpu()

    one_population(0)  # warm-up
    if oracle.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for seed in range(repeats):
        one_population(seed + 1)
    return population * repeats / (time.perf_counter() - started)


def pool_qps(
    app: str, names, population: int, n_context: int, images, trials: int, gens: int, scored: int
):
    """Queries/s of ``trials`` concurrent clients, ``gens`` populations each, ``scored`` images
    a request."""
    from vlmlab.pool import PoolOracle

    barrier = threading.Barrier(trials + 1)
    errors: list[BaseException] = []
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(images.pixels), scored, replace=False) for _ in range(gens)]

    def trial(index: int) -> None:
        try:
            oracle = PoolOracle(app)
            ref = oracle.register_images(images)
            warm = _contexts(oracle.metadata, population, n_context, 1000 + index)
            oracle.logits(warm, names, ref, indices=batches[0], budget_key=f"warm-{index}")
            barrier.wait()
            for generation in range(gens):
                contexts = _contexts(
                    oracle.metadata, population, n_context, index * 100 + generation
                )
                oracle.logits(
                    contexts, names, ref, indices=batches[generation], budget_key=f"t{index}"
                )
        except BaseException as error:  # surfaced below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=trial, args=(i,)) for i in range(trials)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return trials * gens * population / elapsed


def main() -> None:
    from ray import serve

    from vlmlab.pool import PoolOracle, deploy_oracle_pool, ensure_ray

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    precision = args.precision or ("fp16" if on_gpu else "fp32")
    generations = args.generations or (10 if on_gpu else 3)
    reference_population = args.reference_population or (20 if on_gpu else 4)
    threads = torch.get_num_threads()
    card = torch.cuda.get_device_name() if on_gpu else f"CPU, {os.cpu_count()} cores"
    print(
        f"backend=open_clip model={args.model}/random-init precision={precision} device={device} "
        f"({card}) images/request={args.images} generations/trial={generations} "
        f"trials={TRIALS} torch_threads={threads}"
    )
    oracle = OpenClipOracle(args.model, device=device, precision=precision, disk_cache=False)
    rng = np.random.default_rng(0)
    size = 224
    pixels = rng.integers(0, 256, (max(args.images * 2, 16), size, size, 3), dtype=np.uint8)
    images = ImageSet(pixels, {"dataset": "noise-throughput"})
    ref = oracle.register_images(images)

    ensure_ray(num_cpus=max(2, os.cpu_count() or 2))
    backend_kwargs = {"device": device, "precision": precision, "disk_cache": False}
    gpu_share = 0.4 if on_gpu else 0.0
    common = dict(
        backend_kwargs=backend_kwargs,
        num_replicas=1,
        num_cpus=1.0,
        num_gpus=gpu_share,
        max_ongoing_requests=TRIALS,
        torch_threads=None if on_gpu else threads,
    )
    deploy_oracle_pool(f"open_clip:{args.model}", app_name="bench-unbatched", **common)
    deploy_oracle_pool(
        f"open_clip:{args.model}",
        app_name="bench-batched",
        batching={"max_requests": TRIALS, "wait_ms": args.wait_ms},
        **common,
    )
    figures: dict[str, float] = {}
    cases = [("c100", CIFAR100, 20, 16), ("c10", CIFAR10, 20, 4)]
    for label, names, population, n_context in cases:
        a = reference_qps(oracle, names, reference_population, n_context, ref, args.repeats)
        case = (names, population, n_context, images)

        def qps(app: str, trials: int, case: tuple = case) -> float:
            return pool_qps(app, *case, trials, generations, args.images)

        b = qps("bench-unbatched", 1)
        # Interleaved rounds: the machine's drift weighs on both alike.
        unbatched, batched = [], []
        for _ in range(args.rounds):
            unbatched.append(qps("bench-unbatched", TRIALS))
            batched.append(qps("bench-batched", TRIALS))
        c_unbatched, c_batched = float(np.median(unbatched)), float(np.median(batched))
        print(
            f"{label}: C={len(names)} m={n_context} P={population} | (a) reference "
            f"{a:9.1f} q/s (P={reference_population}) | (b) one trial {b:9.1f} q/s | "
            f"(c) {TRIALS} trials unbatched {c_unbatched:9.1f} q/s, batched {c_batched:9.1f} q/s "
            f"| batched/(a) {c_batched / a:7.1f}x  batched/unbatched {c_batched / c_unbatched:5.2f}x"
        )
        figures |= {
            f"qps_reference_{label}": a,
            f"qps_one_trial_{label}": b,
            f"qps_{TRIALS}_unbatched_{label}": c_unbatched,
            f"qps_{TRIALS}_batched_{label}": c_batched,
            f"batched_over_reference_{label}": c_batched / a,
            f"batched_over_unbatched_{label}": c_batched / c_unbatched,
        }
    stats = PoolOracle("bench-batched").replica_stats()["batching"]
    print(f"batched replica: mean batch {stats['mean_batch']:.2f}, sizes {stats['sizes']}")
    if on_gpu:
        print(
            f"peak GPU memory (this process): {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
        )
    serve.delete("bench-unbatched")
    serve.delete("bench-batched")
    print(" ".join(f"{name}={value:.2f}" for name, value in figures.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None)
    parser.add_argument("--generations", type=int, default=None)
    parser.add_argument("--reference-population", type=int, default=None)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--wait-ms", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=2, help="reference populations timed")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved (c) rounds")
    args = parser.parse_args()
    main()
