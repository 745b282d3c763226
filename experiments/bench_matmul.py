"""Matmul backends on this project's shapes: XLA's dot vs the packed-weight CPU kernel, in one run.

Each row is one projection of a model (default: the ~125M benchmark Llama: hidden 768, 12/4 heads of
64, MLP 2048, vocab 32k) at a step's row count M (decode-sized and prefill-sized). Both sides get
operands of `--dtype` (float32: the AVX-512 panel kernel; bfloat16: the AMX tile kernel, both with
float32 accumulation); the kernel's weight is packed once, outside the timing (as the engine does).

    python experiments/bench_matmul.py                      # table
    python experiments/bench_matmul.py --dtype bfloat16     # XLA's bf16 dot vs the AMX kernel
    python experiments/bench_matmul.py --rows 8,64,576 --repeats 50 --plot matmul.png
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu import amx_matmul as amx
from pallas_kernels.cpu import packed_matmul as pm


def projections(hidden: int, heads: int, kv_heads: int, head_dim: int, mlp: int, vocab: int):
    q, kv = heads * head_dim, kv_heads * head_dim
    return [
        ("wqkv", hidden, q + 2 * kv),
        ("wo", q, hidden),
        ("w_gate_up", hidden, 2 * mlp),
        ("w_down", mlp, hidden),
        ("lm_head", hidden, vocab),
    ]


def time_ms(fn, *args, repeats: int) -> float:
    fn(*args).block_until_ready()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args).block_until_ready()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="8,32,64,256,576", help="comma list of M (rows per step)")
    p.add_argument(
        "--shape", default="768,12,4,64,2048,32000", help="hidden,heads,kv_heads,head_dim,mlp,vocab"
    )
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--plot", default=None, help="write a bar chart of GFLOP/s here")
    args = p.parse_args()
    kernel = amx if args.dtype == "bfloat16" else pm
    if not kernel.is_available():
        raise SystemExit(f"packed kernel unavailable: {kernel.unavailable_reason()}")
    dtype = jnp.dtype(args.dtype)
    pack = amx.pack_weight_bf16 if args.dtype == "bfloat16" else pm.pack_weight
    rows = [int(r) for r in args.rows.split(",")]
    projs = projections(*[int(x) for x in args.shape.split(",")])
    xla = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    packed = jax.jit(amx.amx_matmul if args.dtype == "bfloat16" else pm.packed_matmul)
    rng = np.random.default_rng(0)
    table = []
    for m in rows:
        for name, k, n in projs:
            x = jnp.asarray(rng.standard_normal((m, k), np.float32), dtype)
            w = jnp.asarray(rng.standard_normal((k, n), np.float32), dtype)
            pw = pack(w)
            a, b = time_ms(xla, x, w, repeats=args.repeats), time_ms(packed, x, pw, repeats=args.repeats)
            flops = 2 * m * k * n
            table.append((m, name, k, n, a, b, flops / a / 1e6, flops / b / 1e6))
    dev = jax.devices()[0].device_kind
    print(f"device: {dev}, {jax.device_count()} device(s); {args.dtype}; median of {args.repeats}")
    print("| M | projection | K x N | xla dot ms | packed ms | xla GFLOP/s | packed GFLOP/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for m, name, k, n, a, b, ga, gb in table:
        print(f"| {m} | {name} | {k} x {n} | {a:.3f} | {b:.3f} | {ga:.0f} | {gb:.0f} | {a / b:.2f}x |")
    tot_a, tot_b = sum(r[4] for r in table), sum(r[5] for r in table)
    print(f"all rows: xla {tot_a:.2f} ms, packed {tot_b:.2f} ms ({tot_a / tot_b:.2f}x)")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [f"M={r[0]}\n{r[1]}" for r in table]
        xs = np.arange(len(table))
        fig, ax = plt.subplots(figsize=(max(8, len(table) * 0.5), 4))
        ax.bar(xs - 0.2, [r[6] for r in table], 0.4, label="xla dot")
        ax.bar(xs + 0.2, [r[7] for r in table], 0.4, label="packed kernel")
        ax.set_xticks(xs, labels, rotation=90, fontsize=7)
        ax.set_ylabel("GFLOP/s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
