"""Other libraries' checkpoint APIs on distckpt's engine.

``distckpt.compat.datarax``: datarax's handler API (``OrbaxCheckpointHandler``,
``PipelineCheckpoint``, ``IteratorCheckpoint``, ``Checkpointable``,
``CheckpointableIterator``). Code written for it switches by changing its
imports (docs/training_state.md, "Coming from datarax").
"""
