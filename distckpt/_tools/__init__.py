"""One-process tools behind the ``distckpt`` command: ls, gc, audit, diff.

They read checkpoints through the engine (sources, the checked manifest
reader, the storage layer) and never take part in a collective operation.
The engine never imports them.
"""
