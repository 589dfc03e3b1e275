"""The Ray layer's costs, measured side by side in one run.

1. Pool overhead per generation: one BBF-sized oracle call (ConSE, P=20
   candidates, C=10 classes, 320 images) in-process vs through the Serve pool
   (one replica with 2 CPUs, so both compute with 2 torch threads), interleaved.
2. Tune's per-trial overhead: 16 trivial trials (one report each) with
   reuse_actors, wall time per trial.
3. Peak resident memory of one ConSE replica.

    .venv/bin/python benchmarks/ray_layer.py [--repeats 15]

Last line: ``pool_overhead_ratio=<x> tune_trial_overhead_s=<y> replica_peak_rss_mb=<z>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def _pool_vs_local(repeats: int) -> tuple[float, float, float]:
    from vlmlab.data import load_dataset, stratified_subset
    from vlmlab.oracle import create_oracle
    from vlmlab.pool import deploy_oracle_pool

    pool = deploy_oracle_pool("conse", num_replicas=1, num_cpus=2, app_name="bench-pool")
    local = create_oracle("conse")
    train = load_dataset("fashion-mnist", "train")
    images = train.subset(stratified_subset(train.labels, 320, seed=0))
    refs = {
        "pool": pool.register_images(images.image_set()),
        "local": local.register_images(images.image_set()),
    }
    oracles = {"pool": pool, "local": local}
    meta = local.metadata
    ctx = meta.embedding_mean + meta.embedding_std * torch.randn(
        20, 4, meta.token_dim, generator=torch.Generator().manual_seed(0)
    )
    for name in oracles:  # warm-up: first registration on the replica, allocator
        oracles[name].logits(ctx, images.class_names, refs[name])
    times: dict[str, list[float]] = {"pool": [], "local": []}
    for _ in range(repeats):
        for name in ("local", "pool"):
            start = time.perf_counter()
            oracles[name].logits(ctx, images.class_names, refs[name])
            times[name].append(time.perf_counter() - start)
    rss = pool.replica_stats()["peak_rss_mb"]
    return statistics.median(times["local"]), statistics.median(times["pool"]), rss


def _trivial(config):
    from ray import tune

    tune.report({"score": config["x"]})


def _tune_overhead(trials: int) -> float:
    from ray import tune

    with tempfile.TemporaryDirectory() as storage:
        tuner = tune.Tuner(
            tune.with_resources(_trivial, {"cpu": 0.5}),
            param_space={"x": tune.grid_search(list(range(trials)))},
            tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=2),
            run_config=tune.RunConfig(storage_path=storage, name="trivial", verbose=0),
        )
        start = time.perf_counter()
        tuner.fit()
        return (time.perf_counter() - start) / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--trials", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vlmlab.pool import ensure_ray

    ensure_ray(num_cpus=4)
    local, pooled, rss = _pool_vs_local(args.repeats)
    print(
        f"ConSE, P=20, C=10, 320 images, median of {args.repeats}: in-process {local * 1e3:.0f} ms, "
        f"pool (1 replica, 2 CPUs) {pooled * 1e3:.0f} ms, overhead {(pooled - local) * 1e3:.0f} ms/generation"
    )
    from ray import serve

    serve.delete("bench-pool")
    per_trial = _tune_overhead(args.trials)
    print(
        f"Tune: {args.trials} trivial trials, reuse_actors, 2 at a time: {per_trial:.2f} s per trial"
    )
    print(f"ConSE replica peak RSS: {rss:.0f} MB")
    print(
        f"pool_overhead_ratio={pooled / local:.2f} tune_trial_overhead_s={per_trial:.2f} replica_peak_rss_mb={rss:.0f}"
    )
    serve.shutdown()


if __name__ == "__main__":
    main()
