"""Checkpointables for tests: whatever state a test gives them, and what they were given back."""

from __future__ import annotations


class Recorder:
    """A Checkpointable (per process) whose state is whatever the test gives it."""

    def __init__(self, state=None):
        self.state, self.received = state, None

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.received = state


class GlobalRecorder(Recorder):
    """The same, saved once for the job (``checkpoint_global``)."""

    checkpoint_global = True
