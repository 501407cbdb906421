"""`make demo`: what distckpt is for, in about a minute, on plain CPUs.

1. Train examples/train_mlp.py (flax NNX MLP, optax adamw, a 2-axis mesh) on
   2 processes x 4 CPU devices, with async checkpoints and retention.
2. Preempt it with SIGTERM: every process agrees on one step, saves it, and
   the job exits with code 75.
3. Restart on another topology, 4 processes x 2 devices: it resumes from that
   step, data position included, and the loss carries on.
4. Flip one byte of the newest checkpoint: `distckpt verify` catches it; a
   restart refuses to resume from it, and falls back to the step before only
   when told to (--fall-back).
5. `distckpt ls` and a summary.

Checkpoints go to ./demo_checkpoints (or --dir). Every process is real,
joined by jax.distributed over 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
DISTCKPT = [PY, "-m", "distckpt.cli"]
TRAIN = [PY, "examples/train_mlp.py", "--save-every", "25", "--keep", "3", "--batch", "128"]
BOLD, DIM, RED, GREEN, END = (
    ("\033[1m", "\033[2m", "\033[31m", "\033[32m", "\033[0m") if sys.stdout.isatty() else ("",) * 5
)


def title(n: int, text: str) -> None:
    print(f"\n{BOLD}{n}. {text}{END}", flush=True)


def show(line: str, *, indent: str = "   ") -> None:
    print(indent + line.rstrip(), flush=True)


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    out["PYTHONPATH"] = str(ROOT)
    return out


class Run:
    """A `distckpt launch` of the training script, its output shown as it comes."""

    def __init__(self, processes: int, devices: int, *args: str):
        self.began = time.monotonic()
        cmd = [*DISTCKPT, "launch", "-n", str(processes), "-d", str(devices), "--", *TRAIN, *args]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        self.seen = threading.Event()
        self._want: re.Pattern | None = None
        self._threads = [
            threading.Thread(target=self._read_out, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read_out(self) -> None:
        for line in self.proc.stdout:
            if "[Gloo]" in line or "connected peer ranks" in line:  # gloo's chatter
                continue
            self.lines.append(line)
            show(line)
            if self._want is not None and self._want.search(line):
                self.seen.set()

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self.errors.append(line)

    def wait_for(self, pattern: str, timeout: float = 120) -> bool:
        self._want = re.compile(pattern)
        if any(self._want.search(line) for line in self.lines):
            return True
        return self.seen.wait(timeout)

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=5)
        self.seconds = time.monotonic() - self.began
        return code

    def error_lines(self, pattern: str) -> list[str]:
        return [line for line in self.errors if re.search(pattern, line)]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DISTCKPT, *args], cwd=ROOT, env=env(), capture_output=True, text=True)


def last_loss(run: Run) -> str:
    losses = [re.search(r"loss ([0-9.]+)", line) for line in run.lines]
    found = [m.group(1) for m in losses if m]
    return found[-1] if found else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="demo_checkpoints", help="checkpoint directory (recreated)")
    args = ap.parse_args()
    ckpt = (ROOT / args.dir) if not os.path.isabs(args.dir) else Path(args.dir)
    if ckpt.exists():
        shutil.rmtree(ckpt)
    summary: list[tuple[str, str, str, str, str]] = []
    print(f"{BOLD}distckpt demo{END}: checkpoints in {ckpt}")

    title(1, "Train on 2 processes x 4 CPU devices, async checkpoints every 25 steps, keep 3")
    run = Run(2, 4, "--dir", str(ckpt), "--steps", "100000")
    if not run.wait_for(r"step\s+110\b"):
        run.proc.kill()
        print(f"{RED}training did not get going; its errors:{END}\n" + "".join(run.errors[-20:]))
        return 1

    title(2, "Preemption: SIGTERM to every process")
    run.proc.send_signal(signal.SIGTERM)
    code = run.finish()
    preempted = next((line for line in run.lines if "preempted" in line), "")
    step = re.search(r"step (\d+)", preempted)
    if code != 75 or step is None:
        print(f"{RED}expected exit code 75 after an emergency save, got {code}{END}")
        print("".join(run.errors[-20:]))
        return 1
    saved = int(step.group(1))
    show(f"{GREEN}exit code {code}: both processes saved step {saved} and stopped{END}")
    summary.append(
        ("train, preempted", "2 x 4", f"1..{saved}", last_loss(run), f"{run.seconds:.0f} s")
    )

    title(3, "Restart on 4 processes x 2 devices: resume from the emergency save")
    target = saved + 40
    run = Run(4, 2, "--dir", str(ckpt), "--steps", str(target))
    code = run.finish()
    if code != 0:
        print(f"{RED}resume failed with {code}{END}\n" + "".join(run.errors[-20:]))
        return 1
    summary.append(
        (
            "resume elsewhere",
            "4 x 2",
            f"{saved + 1}..{target}",
            last_loss(run),
            f"{run.seconds:.0f} s",
        )
    )

    title(4, "Flip one byte of the newest checkpoint")
    newest = ckpt / f"step_{target:08d}"
    data = sorted(newest.glob("attempt-*/*.bin"))[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    show(f"flipped a bit in {data.relative_to(ROOT) if data.is_relative_to(ROOT) else data}")
    check = cli("verify", str(newest))
    show(f"$ distckpt verify {newest.name}   -> exit code {check.returncode}")
    for line in (check.stderr or check.stdout).splitlines()[:3]:
        show(DIM + line[:160] + END, indent="     ")

    show("restart without --fall-back: refuses to resume from damaged data")
    run = Run(2, 4, "--dir", str(ckpt), "--steps", str(target + 20))
    code = run.finish()
    for line in run.error_lines(r"errors\.CorruptCheckpointError:|fails its crc32c")[:2]:
        show(DIM + line.strip()[:160] + END, indent="     ")
    show(f"{GREEN if code != 0 else RED}exit code {code}{END}")
    summary.append(("resume, corrupt", "2 x 4", "-", "refused", f"{run.seconds:.0f} s"))

    show("restart with --fall-back: resumes from the newest intact step")
    run = Run(2, 4, "--dir", str(ckpt), "--steps", str(target + 20), "--fall-back")
    code = run.finish()
    if code != 0:
        print(f"{RED}fall-back resume failed with {code}{END}\n" + "".join(run.errors[-20:]))
        return 1
    resumed = next((line for line in run.lines if "fell back" in line), "")
    back = re.search(r"fell back to step (\d+)", resumed)
    summary.append(
        (
            "resume, --fall-back",
            "2 x 4",
            f"{int(back.group(1)) + 1 if back else '?'}..{target + 20}",
            last_loss(run),
            f"{run.seconds:.0f} s",
        )
    )

    title(5, "distckpt ls, and distckpt verify --all")
    for line in cli("ls", str(ckpt)).stdout.splitlines():
        show(line)
    verify_all = cli("verify", "--all", str(ckpt))
    show(f"$ distckpt verify --all {ckpt.name}   -> exit code {verify_all.returncode}")
    show(verify_all.stdout.strip().splitlines()[-1], indent="     ")

    print(f"\n{BOLD}Summary{END}")
    header = ("phase", "processes x devices", "steps", "last loss", "time")
    widths = [max(len(str(r[i])) for r in [header, *summary]) for i in range(len(header))]
    for row in [header, *summary]:
        show("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    print(
        "\nEvery restart picked up parameters, optimizer state and each process's data "
        "position\nfrom the checkpoint, on whatever topology it had. Try: "
        f"distckpt inspect {ckpt.name}/step_{target:08d}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
