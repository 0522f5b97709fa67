"""The grain training pipeline: sharding, epochs, exact resume, augmentation, bad records."""

import hashlib
import io
import json
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from magjax.data import augment, builders
from magjax.data.pipeline import TrainPipeline

N = 60  # 15 identities x 4 images


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = builders.prepare(
        "synthetic",
        None,
        tmp_path_factory.mktemp("pipe") / "syn",
        num_identities=15,
        images_per_identity=4,
        num_heldout=2,
        num_pairs=2,
        seed=1,
    )
    b = tfds.builder_from_directory(str(builders.find_dataset_dir(root)))
    src = b.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    records = [src[i] for i in range(len(src))]
    return root, records


def _digest(img: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


def _pixel_index(records):
    """Pillow's decode of each stored JPEG -> record index."""
    return {
        _digest(np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"))): i
        for i, r in enumerate(records)
    }


def _take(pipe, k):
    return [next(pipe) for _ in range(k)]


def test_hosts_cover_each_example_once_per_epoch(dataset):
    root, records = dataset
    index = _pixel_index(records)
    hosts = [
        TrainPipeline(
            root, global_batch=8, seed=5, augment="none", process_index=p, process_count=2
        )
        for p in range(2)
    ]
    assert hosts[0].num_examples == N and hosts[0].num_classes == 15
    assert hosts[0].local_batch == 4 and hosts[0].steps_per_epoch == 7
    epochs = []
    for _ in range(2):
        seen = []
        for _ in range(7):
            batches = [next(h) for h in hosts]
            for b in batches:
                assert b["image"].shape == (4, 112, 112, 3) and b["image"].dtype == np.uint8
                assert b["label"].dtype == np.int32
                for img, label in zip(b["image"], b["label"], strict=True):
                    rec = index[_digest(img)]  # bit-exact Pillow decode of a stored record
                    assert records[rec]["label"] == label
                    seen.append(rec)
        assert len(seen) == len(set(seen)) == 56  # N mod G = 4 dropped, nothing repeated
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    # The global batch does not depend on the number of hosts.
    single = TrainPipeline(root, global_batch=8, seed=5, augment="none")
    hosts = [
        TrainPipeline(
            root, global_batch=8, seed=5, augment="none", process_index=p, process_count=2
        )
        for p in range(2)
    ]
    for _ in range(3):
        joined = np.concatenate([next(h)["image"] for h in hosts])
        assert np.array_equal(next(single)["image"], joined)


def test_resume_continues_bit_exactly(dataset):
    root, _ = dataset
    kw = dict(global_batch=8, seed=11, augment="adaface")
    reference = _take(TrainPipeline(root, **kw), 12)
    first = TrainPipeline(root, **kw)
    _take(first, 9)  # crosses the epoch boundary at 7
    state = json.loads(json.dumps(first.get_state()))
    resumed = TrainPipeline(root, **kw)
    resumed.set_state(state)
    for want, got in zip(reference[9:], _take(resumed, 3), strict=True):
        assert np.array_equal(want["image"], got["image"])
        assert np.array_equal(want["label"], got["label"])
    other = TrainPipeline(root, global_batch=8, seed=12, augment="adaface")
    assert not np.array_equal(next(other)["label"], reference[0]["label"])
    with pytest.raises(ValueError, match="seed=11 but this pipeline has 12"):
        other.set_state(state)


def test_argument_errors(dataset):
    root, _ = dataset
    with pytest.raises(ValueError, match="multiple of process_count 3"):
        TrainPipeline(root, global_batch=8, seed=0, process_count=3)
    with pytest.raises(ValueError, match="is more than the 60 images in"):
        TrainPipeline(root, global_batch=64, seed=0)
    with pytest.raises(ValueError, match="augment must be one of"):
        TrainPipeline(root, global_batch=8, seed=0, augment="mixup")
    with pytest.raises(FileNotFoundError, match="no prepared dataset"):
        TrainPipeline(root / "nope", global_batch=8, seed=0)


def test_augmentations_are_deterministic_and_do_something(dataset):
    _, records = dataset
    data = records[0]["image"]
    plain = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(augment.augment_image(data, "none", None), plain)
    flips = [
        augment.augment_image(data, "flip", np.random.default_rng([0, 0, i])) for i in range(200)
    ]
    flipped = [np.array_equal(f, plain[:, ::-1]) for f in flips]
    assert all(fl or np.array_equal(f, plain) for f, fl in zip(flips, flipped, strict=True))
    assert 70 < sum(flipped) < 130
    ada = [
        augment.augment_image(data, "adaface", np.random.default_rng([3, 1, i])) for i in range(200)
    ]
    again = [
        augment.augment_image(data, "adaface", np.random.default_rng([3, 1, i])) for i in range(200)
    ]
    assert all(np.array_equal(a, b) for a, b in zip(ada, again, strict=True))
    changed = sum(not (np.array_equal(a, plain) or np.array_equal(a, plain[:, ::-1])) for a in ada)
    # P(at least one of three p=0.2 augmentations) = 1 - 0.8^3 = 0.488.
    assert 70 < changed < 130
    resized = [
        augment.augment_image(data, "adaface_resized", np.random.default_rng([3, 1, i]))
        for i in range(20)
    ]
    # Same draws, so the same images unless the crop fired (then: resized instead of padded).
    same = [np.array_equal(a, b) for a, b in zip(ada[:20], resized, strict=True)]
    assert 0 < sum(same) < 20


def test_adaface_parts():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (112, 112, 3), np.uint8))
    rng = np.random.default_rng(1)
    for _ in range(20):
        for fn in (augment.random_resized_crop, augment.low_resolution, augment.photometric):
            if fn is augment.random_resized_crop:
                assert augment.random_resized_crop(im, rng, resize=False).size == (112, 112)
            out = fn(im, rng)
            assert out.size == (112, 112) and out.mode == "RGB"
    # A full-area crop with ratio 1 is the identity; photometric factors of 1 are too.
    assert np.array_equal(
        np.asarray(augment.random_resized_crop(im, rng, scale=(1, 1), ratio=(1, 1))),
        np.asarray(im),
    )
    # AdaFace's crop keeps the box in place on a black canvas.
    kept = np.asarray(
        augment.random_resized_crop(im, rng, scale=(0.25, 0.25), ratio=(1, 1), resize=False)
    )
    rows, cols = np.nonzero(kept.any(-1))
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    assert kept[box].shape[:2] == (56, 56)
    assert np.array_equal(kept[box], np.asarray(im)[box]) and kept.any(-1).sum() == 56 * 56
    assert np.array_equal(np.asarray(augment.photometric(im, rng, strength=0.0)), np.asarray(im))


def test_corrupt_record_at_load_time_is_skipped(dataset, caplog):
    root, records = dataset
    pipe = TrainPipeline(root, global_batch=8, seed=0, augment="flip")
    real = pipe._loader.source
    bad = int(np.random.default_rng([0, 0]).permutation(N)[3])  # in the first batch

    class Damaged:
        def __len__(self):
            return len(real)

        def __getitem__(self, i):
            ex = real[i]
            return {**ex, "image": ex["image"][:200]} if i == bad else ex

    pipe._loader.source = Damaged()
    with caplog.at_level(logging.WARNING):
        batches = _take(pipe, 8)
    assert f"skipping record {bad} (epoch 0)" in caplog.text
    assert all(b["image"].shape == (8, 112, 112, 3) for b in batches)


def test_worker_processes_give_the_same_batches(dataset):
    root, _ = dataset
    kw = dict(global_batch=8, seed=2, augment="adaface")
    want = _take(TrainPipeline(root, **kw), 3)
    got = _take(TrainPipeline(root, num_workers=1, **kw), 3)
    for a, b in zip(want, got, strict=True):
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])


def test_the_reading_pipeline_does_not_import_the_dataset_builders():
    """Training reads prepared data through magjax.data.prepared; the builders (which write
    datasets) stay out of the reading side."""
    import subprocess
    import sys

    code = (
        "import sys, magjax.data.pipeline, magjax.data.prepared; "
        "assert 'magjax.data.builders' not in sys.modules, 'builders imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
