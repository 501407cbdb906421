"""How coordination cost grows with the number of processes: counts and times of small saves.

The one-leaf case of ``scripts/scale.py`` (``--cases one-leaf``), under the
name and options docs/benchmarks.md used: for each N, ``distckpt launch -n
N -d 1`` saves and restores a one-leaf tree ``--reps`` times, counts what
each process asks of the coordination service per phase (a counting wrapper
of the client), and times the floor of any 3-phase protocol on the same job,
3 x (one status write + a barrier), so "x floor" is a save's latency against
that floor. The counting wrapper and the floor live in scale.py.

    .venv/bin/python scripts/scale_coord.py --processes 2,4,8,16 --json out.json
    PYTHONPATH=/path/to/other/checkout .venv/bin/python scripts/scale_coord.py ...

The second form measures another checkout of distckpt with the same script
(the workers import the ``distckpt`` this script imports).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402 - found next to this script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="2,4,8,16", help="comma-separated process counts")
    parser.add_argument("--reps", type=int, default=10, help="saves and restores per process")
    parser.add_argument("--json", help="write the results here (scale.py's JSON)")
    args = parser.parse_args(argv)
    forwarded = ["--cases", "one-leaf", "--processes", args.processes]
    forwarded += ["--small-reps", str(args.reps)]
    return scale.main(forwarded + (["--json", args.json] if args.json else []))


if __name__ == "__main__":
    sys.exit(main())
