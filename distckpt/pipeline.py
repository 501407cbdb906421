"""A reference data iterator whose checkpoint resumes the exact batch sequence.

``ShuffledIterator`` walks ``range(num_examples)`` in epochs, shuffled per
epoch from a seed, and hands each process its slice of every global batch.
It implements ``distckpt.CheckpointableIterator``: pass it as ``pipeline=``
to ``save`` / ``CheckpointManager.save`` and to ``restore``, and the
restored iterator yields exactly the batches an uninterrupted run would have.

Its position is global (epoch and global batch number), so without a
per-process random stream it declares ``checkpoint_global`` and resumes on
any process count: each process re-derives its slice. With
``transform_seed`` each process also owns a random stream (for example for
augmentation); that state is per process and needs the same process count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


class ShuffledIterator:
    """Per-process batches of example indices, shuffled per epoch.

    Args:
      num_examples: size of the dataset; examples are ``0 .. num_examples-1``.
      global_batch_size: examples per step over all processes; divisible by
        the process count. The last partial batch of an epoch is dropped.
      seed: the shuffling seed; epoch ``e`` uses a permutation drawn from
        ``(seed, e)``, so any epoch can be recomputed.
      shuffle: False walks the examples in order.
      num_epochs: stop after this many epochs (None: never stop).
      process_index, process_count: this process's slice; default
        ``jax.process_index()`` / ``jax.process_count()``.
      transform: ``transform(indices, rng) -> batch`` turns this process's
        indices into a batch (load, augment); ``rng`` is this process's
        ``numpy.random.Generator``, or None without ``transform_seed``.
      transform_seed: seeds a per-process random stream given to
        ``transform``; its state is checkpointed per process.

    Example::

      it = ShuffledIterator(50_000, global_batch_size=256, seed=0)
      mgr.restore(step, target, pipeline=it)    # resumes the batch sequence
      for step in range(step + 1, num_steps):
          batch = next(it)
          ...
          mgr.save(step, state, pipeline=it)
    """

    def __init__(
        self,
        num_examples: int,
        global_batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        transform: Callable[[np.ndarray, np.random.Generator | None], Any] | None = None,
        transform_seed: int | None = None,
    ):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by the "
                f"{process_count} processes"
            )
        if not 0 < global_batch_size <= num_examples:
            raise ValueError(
                f"global_batch_size must be in 1..num_examples ({num_examples}), "
                f"got {global_batch_size}"
            )
        self.num_examples, self.global_batch_size = num_examples, global_batch_size
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.process_index, self.process_count = process_index, process_count
        self.transform, self.transform_seed = transform, transform_seed
        self.local_batch_size = global_batch_size // process_count
        self.batches_per_epoch = num_examples // global_batch_size
        self.epoch, self.batch = 0, 0
        self._order: tuple[int, np.ndarray] | None = None
        self.rng = (
            None
            if transform_seed is None
            else np.random.default_rng([transform_seed, process_index])
        )

    @property
    def checkpoint_global(self) -> bool:
        """True when the state is the same on every process (no per-process stream)."""
        return self.rng is None

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        start = self.batch * self.global_batch_size + self.process_index * self.local_batch_size
        indices = self._epoch_order()[start : start + self.local_batch_size]
        self.batch += 1
        return indices if self.transform is None else self.transform(indices, self.rng)

    def _epoch_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(
                    self.num_examples
                )
            else:
                order = np.arange(self.num_examples)
            self._order = (self.epoch, order)
        return self._order[1]

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_examples": self.num_examples,
            "global_batch_size": self.global_batch_size,
        }
        if self.rng is not None:
            state["rng"] = self.rng.bit_generator.state
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        mine = self.get_state()
        differ = [
            f"{k}: saved {state.get(k)!r}, this iterator has {mine[k]!r}"
            for k in ("seed", "shuffle", "num_examples", "global_batch_size")
            if state.get(k) != mine[k]
        ]
        if ("rng" in state) != (self.rng is not None):
            differ.append(
                "transform_seed: the saved iterator "
                + ("had" if "rng" in state else "had no")
                + " per-process random stream, this one "
                + ("has none" if self.rng is None else "has one")
            )
        if differ:
            raise ValueError(
                "the saved data position belongs to a differently configured iterator; "
                "resuming it here would not continue the same sequence:\n  " + "\n  ".join(differ)
            )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        if self.rng is not None:
            self.rng.bit_generator.state = state["rng"]
