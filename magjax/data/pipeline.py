"""The training input pipeline: grain over the TFDS array_record data source.

Order of examples. Epoch e is a permutation of all N examples seeded by (seed, e). Global batch
b of the epoch is the slice [b*G, (b+1)*G) of that permutation (G = global batch), and host p
takes rows [p*L, (p+1)*L) of it (L = G / process_count). The N mod G examples left at the end
of an epoch are dropped (a different few each epoch). So the hosts together see every example
once per epoch, the global batches do not depend on the number of hosts, and the position in
the stream is one integer: the global step. That integer is the checkpointable state, which
makes resume exact even with another host count.

Each element of the grain dataset is one host batch (the batch index maps to record indices as
above); decoding and augmentation run inside grain's prefetch threads (Pillow releases the GIL)
or in ``num_workers`` grain worker processes. Augmentation randomness is seeded per example by
(seed, epoch, record index), so it does not depend on threads, workers or resumes.

A record that cannot be decoded is logged with its index and replaced by the next decodable
record of the epoch permutation, so a bad file never stops training. Normalisation is not done
here: the model applies its input convention on device.
"""

from __future__ import annotations

import logging
import os
import threading

import grain
import numpy as np
import tensorflow_datasets as tfds

from magjax.data import augment as augment_lib
from magjax.data.prepared import find_dataset_dir  # reads; never the builders
from magjax.errors import UserError

log = logging.getLogger(__name__)

_MAX_REPLACEMENTS = 64


class _BatchLoader(grain.transforms.Map):
    """Maps a host-batch index to the decoded, augmented batch (picklable for grain workers)."""

    def __init__(
        self,
        source,
        *,
        num_examples: int,
        global_batch: int,
        local_batch: int,
        process_index: int,
        seed: int,
        augment: str,
        image_size: int,
    ):
        self.source = source
        self.num_examples, self.global_batch = num_examples, global_batch
        self.local_batch = local_batch
        self.offset = process_index * local_batch
        self.steps_per_epoch = num_examples // global_batch
        self.seed, self.augment, self.size = seed, augment, image_size
        self._perm_cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_perm_cache"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perm_cache.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
                self._perm_cache = {
                    epoch: perm,
                    **{k: v for k, v in self._perm_cache.items() if k == epoch - 1},
                }
            return perm

    def map(self, step: int) -> dict[str, np.ndarray]:
        epoch, b = divmod(int(step), self.steps_per_epoch)
        perm = self.permutation(epoch)
        start = b * self.global_batch + self.offset
        images = np.empty((self.local_batch, self.size, self.size, 3), np.uint8)
        labels = np.empty((self.local_batch,), np.int32)
        for i in range(self.local_batch):
            pos = start + i
            for attempt in range(_MAX_REPLACEMENTS):
                record = int(perm[(pos + attempt) % self.num_examples])
                ex = self.source[record]
                rng = None
                if self.augment != "none":
                    rng = np.random.default_rng([self.seed, epoch, record])
                try:
                    images[i] = augment_lib.augment_image(ex["image"], self.augment, rng, self.size)
                    labels[i] = ex["label"]
                    break
                except augment_lib.DECODE_ERRORS as e:
                    log.warning(
                        "skipping record %d (epoch %d): cannot decode image: %s", record, epoch, e
                    )
            else:
                raise RuntimeError(
                    f"{_MAX_REPLACEMENTS} consecutive records from position {pos} of epoch "
                    f"{epoch} cannot be decoded: the dataset is damaged"
                )
        return {"image": images, "label": labels}


class TrainPipeline:
    """Endless host-local training batches ``{"image": uint8 [L,S,S,3] RGB, "label": int32 [L]}``.

    ``data_dir`` is a prepared dataset (its root or its TFDS version directory). ``get_state()``
    / ``set_state()`` save and restore the position (JSON-serialisable) so that a resumed run
    continues at exactly the next example.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        global_batch: int,
        seed: int,
        augment: str = "flip",
        process_index: int = 0,
        process_count: int = 1,
        image_size: int = 112,
        num_workers: int = 0,
    ):
        if augment not in augment_lib.AUGMENTATIONS:
            raise ValueError(f"augment must be one of {augment_lib.AUGMENTATIONS}, not {augment!r}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if global_batch < 1 or global_batch % process_count:
            raise ValueError(
                f"global_batch {global_batch} must be a positive multiple of process_count "
                f"{process_count}"
            )
        self.dataset_dir = find_dataset_dir(data_dir)
        builder = tfds.builder_from_directory(str(self.dataset_dir))
        self.num_examples = int(builder.info.splits["train"].num_examples)
        self.num_classes = int(builder.info.features["label"].num_classes)
        if global_batch > self.num_examples:
            raise UserError(
                f"config.global_batch {global_batch} is more than the {self.num_examples} "
                f"images in {data_dir}: pass a smaller --config.global_batch (a multiple of "
                "the device count)"
            )
        self.global_batch, self.seed, self.augment = global_batch, seed, augment
        self.local_batch = global_batch // process_count
        self.process_index, self.process_count = process_index, process_count
        self.steps_per_epoch = self.num_examples // global_batch
        self.num_workers = num_workers
        source = builder.as_data_source(
            split="train", decoders={"image": tfds.decode.SkipDecoding()}
        )
        self._loader = _BatchLoader(
            source,
            num_examples=self.num_examples,
            global_batch=global_batch,
            local_batch=self.local_batch,
            process_index=process_index,
            seed=seed,
            augment=augment,
            image_size=image_size,
        )
        self._step = 0
        self._iterator = None

    def _make_iterator(self):
        ds = grain.MapDataset.range(self._step, 2**62).map(self._loader)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
        if self.num_workers > 0:
            from absl import flags

            # grain workers read absl flags; outside absl.app.run nothing parsed them.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
        return iter(it)

    def __iter__(self) -> TrainPipeline:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._make_iterator()
        batch = next(self._iterator)
        self._step += 1
        return batch

    @property
    def step(self) -> int:
        """Number of global batches consumed so far (the epoch is step // steps_per_epoch)."""
        return self._step

    def get_state(self) -> dict:
        return {
            "step": self._step,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "num_examples": self.num_examples,
            "augment": self.augment,
        }

    def set_state(self, state: dict) -> None:
        """Continues at ``state["step"]``; the stream it came from must match this one."""
        for key in ("seed", "global_batch", "num_examples", "augment"):
            if key in state and state[key] != getattr(self, key):
                raise UserError(
                    f"pipeline state has {key}={state[key]!r} but this pipeline has "
                    f"{getattr(self, key)!r}: resuming would not continue the same stream"
                )
        self._step = int(state["step"])
        self._iterator = None
