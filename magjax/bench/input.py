"""Input benchmark: JPEG decode + augmentation throughput per CPU core for 112x112 faces.

  python -m magjax.bench input [--images 1024] [--rounds 3] [--pipeline-batches 40]

Two measurements, each reported as images per CPU-second (process CPU time, so the figure is
per core whatever the number of threads) and per wall-second:
* ``decode_<aug>``: the per-example function of the pipeline (Pillow decode, per-example seeded
  RNG, augmentation) in a single thread, for augment = none, flip and adaface;
* ``pipeline_flip``: the whole TrainPipeline (grain, prefetch threads, batching into uint8
  [B,112,112,3]) over a synthetic TFDS dataset prepared in a temporary directory.
Images are synthetic faces at the training quality mix, JPEG q95 (~5-6 KB, like aligned face
crops). The goal is >= 1,500 images per core-second with flip only. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def _per_example(jpegs: list[bytes], kind: str, rounds: int) -> dict:
    from magjax.data import augment

    best_cpu = best_wall = 0.0
    for r in range(rounds):
        c0, w0 = time.process_time(), time.perf_counter()
        for i, data in enumerate(jpegs):
            rng = None if kind == "none" else np.random.default_rng([0, r, i])
            augment.augment_image(data, kind, rng)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        best_cpu = max(best_cpu, len(jpegs) / cpu)
        best_wall = max(best_wall, len(jpegs) / wall)
    return {"images_per_cpu_s": round(best_cpu), "images_per_wall_s": round(best_wall)}


def _pipeline(batches: int, batch: int) -> dict:
    from magjax.data import builders
    from magjax.data.pipeline import TrainPipeline

    with tempfile.TemporaryDirectory() as tmp:
        root = builders.prepare(
            "synthetic",
            None,
            os.path.join(tmp, "syn"),
            num_identities=64,
            images_per_identity=16,
            num_heldout=2,
            num_pairs=2,
        )
        pipe = TrainPipeline(root, global_batch=batch, seed=0, augment="flip")
        next(pipe)  # start-up (threads, first reads) is not throughput
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(batches):
            next(pipe)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    n = batches * batch
    return {"images_per_cpu_s": round(n / cpu), "images_per_wall_s": round(n / wall)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m magjax.bench input",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3, help="best of this many passes")
    p.add_argument("--pipeline-batches", type=int, default=40)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)

    from magjax.data import synthetic

    cfg = synthetic.SyntheticConfig()
    faces = synthetic.SyntheticFaces(cfg)
    jpegs = []
    for _, jpeg, *_ in faces.train_examples():
        jpegs.append(jpeg)
        if len(jpegs) == args.images:
            break
    result = {
        "images": len(jpegs),
        "mean_jpeg_bytes": round(float(np.mean([len(j) for j in jpegs]))),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    for kind in ("none", "flip", "adaface"):
        r = _per_example(jpegs, kind, args.rounds)
        result[f"decode_{kind}"] = r
        print(
            f"decode + {kind:8s}: {r['images_per_cpu_s']:6d} images/s per core "
            f"({r['images_per_wall_s']} images/s wall, 1 thread)"
        )
    r = _pipeline(args.pipeline_batches, args.batch)
    result["pipeline_flip"] = r
    print(
        f"TrainPipeline flip: {r['images_per_cpu_s']:6d} images/s per core "
        f"({r['images_per_wall_s']} images/s wall, batch {args.batch})"
    )
    result["goal_flip_images_per_core_s"] = 1500
    result["meets_goal"] = result["decode_flip"]["images_per_cpu_s"] >= 1500
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
