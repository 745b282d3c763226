#!/usr/bin/env python
"""MoE expert paths on CPU, in one run: all experts on all tokens (one-hot einsum) vs tokens
grouped per expert (sort + tiles), across step token counts. Sets `DENSE_MAX_TOKENS` in
pagedjax/models/layers/moe.py (the token count up to which the dense path runs).

Shapes are one MoE layer of a real model family, scaled to fit this 2-core machine's time:
  mixtral-half: hidden 2048, 8 experts of 7168, top 2   (Mixtral 8x7B at half width)
  qwen3moe:     hidden 2048, 128 experts of 768, top 8   (Qwen3-30B-A3B's layer, full size)

    python experiments/bench_moe.py                      # bf16, table + JSON + PNG
    python experiments/bench_moe.py --tokens 1,8,64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.models.layers.moe import GROUP_TILE, experts_dense, experts_grouped, route
from pagedjax.platform import describe

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"mixtral-half": (2048, 7168, 8, 2), "qwen3moe": (2048, 768, 128, 8)}


def time_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,2,4,8,16,64,256,1024")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-dense-tokens", type=int, default=256, help="skip the dense path above this")
    p.add_argument("--output-json", default=str(RESULTS / "bench_moe.json"))
    p.add_argument("--plot", default=str(RESULTS / "bench_moe.png"))
    args = p.parse_args()
    dtype = jnp.dtype(args.dtype)
    tokens = [int(t) for t in args.tokens.split(",")]
    rng = np.random.default_rng(0)
    dense, grouped = jax.jit(experts_dense), jax.jit(experts_grouped)
    rows = []
    for shape in args.shapes.split(","):
        H, F, E, k = SHAPES[shape]
        w_gu = jnp.asarray(rng.standard_normal((E, H, 2 * F), np.float32) / np.sqrt(H), dtype)
        w_d = jnp.asarray(rng.standard_normal((E, F, H), np.float32) / np.sqrt(F), dtype)
        for T in tokens:
            x = jnp.asarray(rng.standard_normal((T, H), np.float32))
            weights, experts = route(jnp.asarray(rng.standard_normal((T, E), np.float32)), k, True)
            g = time_ms(grouped, x, weights, experts, w_gu, w_d, repeats=args.repeats)
            d = None
            if T <= args.max_dense_tokens:
                d = time_ms(dense, x, weights, experts, w_gu, w_d, repeats=args.repeats)
            rows.append({"shape": shape, "tokens": T, "dense_ms": d, "grouped_ms": g})
            ratio = f"{d / g:.2f}x" if d else "-"
            print(
                f"{shape:13s} T={T:5d}  dense {d if d else float('nan'):9.2f} ms"
                f"  grouped {g:9.2f} ms  dense/grouped {ratio}"
            )
    doc = {
        "benchmark": "bench_moe",
        "date": time.strftime("%Y-%m-%d"),
        "machine": describe(),
        "cpu": platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "group_tile": GROUP_TILE,
        "repeats": args.repeats,
        "shapes": {
            s: dict(zip(("hidden", "expert_hidden", "experts", "top_k"), SHAPES[s], strict=True))
            for s in args.shapes.split(",")
        },
        "rows": rows,
    }
    Path(args.output_json).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.output_json}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(doc["shapes"]), figsize=(6 * len(doc["shapes"]), 4), squeeze=False)
        for ax, shape in zip(axes[0], doc["shapes"], strict=True):
            rs = [r for r in rows if r["shape"] == shape]
            ax.plot([r["tokens"] for r in rs], [r["grouped_ms"] for r in rs], "o-", label="grouped")
            rd = [r for r in rs if r["dense_ms"]]
            ax.plot([r["tokens"] for r in rd], [r["dense_ms"] for r in rd], "s-", label="dense")
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="tokens in the step",
                ylabel="ms per layer",
                title=f"{shape} ({args.dtype})",
            )
            ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
