"""distckpt: multi-host checkpointing for JAX.

Every process writes only its own shards, the primary commits atomically,
every chunk carries a checksum, and restore reshards onto whatever mesh the
job has now.
"""

from distckpt import errors as errors
from distckpt import pipeline as pipeline
from distckpt._cluster import initialize as initialize
from distckpt._convert import convert as convert
from distckpt._copy import copy as copy
from distckpt._inspect import CheckpointInfo as CheckpointInfo
from distckpt._inspect import LeafInfo as LeafInfo
from distckpt._inspect import VerifyReport as VerifyReport
from distckpt._inspect import is_committed as is_committed
from distckpt._inspect import metadata as metadata
from distckpt._inspect import verify as verify
from distckpt._procstate import Checkpointable as Checkpointable
from distckpt._procstate import CheckpointableIterator as CheckpointableIterator
from distckpt._restore import restore as restore
from distckpt._save import SaveStats as SaveStats
from distckpt._save import save as save
from distckpt._target import abstract_like as abstract_like
from distckpt.handler import CheckpointHandler as CheckpointHandler
from distckpt.handler import PipelineCheckpoint as PipelineCheckpoint
from distckpt.manager import PREEMPTED_EXIT_CODE as PREEMPTED_EXIT_CODE
from distckpt.manager import CheckpointManager as CheckpointManager
from distckpt.manager import forward_signal as forward_signal

__version__ = "0.1.0.dev0"

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "CheckpointHandler",
    "CheckpointInfo",
    "Checkpointable",
    "CheckpointableIterator",
    "CheckpointManager",
    "LeafInfo",
    "PipelineCheckpoint",
    "SaveStats",
    "VerifyReport",
    "abstract_like",
    "convert",
    "copy",
    "errors",
    "pipeline",
    "forward_signal",
    "initialize",
    "is_committed",
    "metadata",
    "restore",
    "save",
    "verify",
]
