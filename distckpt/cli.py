"""The ``distckpt`` command. Subcommands arrive with the CLI issue; for now it
can tell whether a checkpoint is committed and verify it."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from distckpt import __version__

    parser = argparse.ArgumentParser(prog="distckpt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"distckpt {__version__}")
    sub = parser.add_subparsers(dest="command")
    p_verify = sub.add_parser("verify", help="re-read a checkpoint and check every checksum")
    p_verify.add_argument("path")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "verify":
        import distckpt
        from distckpt.errors import DistckptError

        try:
            report = distckpt.verify(args.path)
        except DistckptError as e:
            print(f"FAILED: {e}", file=sys.stderr)
            return 1
        print(
            f"OK: {report.directory}: {report.leaves} leaves, {report.files} files, "
            f"{report.chunks} chunks, {report.bytes_checked} bytes checked in {report.seconds:.2f} s"
        )
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
