"""The compression case of scripts/bench.py, in one process: prints one JSON document.

A realistic state, by kind of leaf, because they compress differently:
float32 weights (random-normal init, then some training), bfloat16 weights,
and adam's first and second moments after a few updates. Each is saved
raw and with zstd at several levels, then restored; the parent prints the
ratio (raw bytes / stored bytes) and the cost (seconds against raw).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time


def main(mib: int, reps: int, levels: list[int]) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import distckpt

    n = mib * (1 << 20) // 4 // 4  # four kinds, float32-sized budget each
    side = int(n**0.5)
    key = jax.random.key(0)
    w = jax.random.normal(key, (side, side), jnp.float32) * 0.02
    opt = optax.adam(1e-3)
    state = opt.init(w)
    for i in range(5):
        g = jax.random.normal(jax.random.fold_in(key, i), w.shape) * 1e-3
        upd, state = opt.update(g, state, w)
        w = optax.apply_updates(w, upd)
    kinds = {
        "weights f32": w,
        "weights bf16": w.astype(jnp.bfloat16),
        "adam mu": state[0].mu,
        "adam nu": state[0].nu,
    }
    root = tempfile.mkdtemp(prefix="distckpt-bench-compress-")
    out = {"bytes_per_kind": {k: int(v.nbytes) for k, v in kinds.items()}, "rows": []}
    try:
        for name, leaf in kinds.items():
            for level in [None, *levels]:
                saves, restores, stored = [], [], None
                for r in range(reps + 1):  # the first is a warm-up
                    path = f"{root}/{name.replace(' ', '_')}_{level}_{r}"
                    t = time.perf_counter()
                    distckpt.save(
                        path,
                        {"x": leaf},
                        compression="zstd" if level else None,
                        compression_level=level or 3,
                    )
                    t1 = time.perf_counter()
                    distckpt.restore(path)
                    t2 = time.perf_counter()
                    stored = distckpt.metadata(path).total_bytes
                    shutil.rmtree(path)
                    if r:
                        saves.append(t1 - t)
                        restores.append(t2 - t1)
                out["rows"].append(
                    {
                        "kind": name,
                        "compression": f"zstd {level}" if level else "raw",
                        "raw_bytes": int(leaf.nbytes),
                        "stored_bytes": stored,
                        "ratio": leaf.nbytes / stored,
                        "save_s": sorted(saves)[len(saves) // 2],
                        "restore_s": sorted(restores)[len(restores) // 2],
                    }
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


if __name__ == "__main__":
    mib, reps = int(sys.argv[1]), int(sys.argv[2])
    levels = [int(x) for x in sys.argv[3].split(",")]
    print(json.dumps(main(mib, reps, levels)))
