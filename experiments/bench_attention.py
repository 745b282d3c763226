#!/usr/bin/env python
"""Time every paged-attention backend on decode-heavy, prefill-heavy and mixed steps; print a table.

The baseline is `gather_all_paged_attention` (every query row gathers its sequence's whole context
and runs one masked softmax); the engine's CPU default is the chunked online-softmax
`paged_attention`. The "pallas" column is the Pallas ragged kernel (pallas_kernels/
ragged_paged_attention.py): Triton on a GPU; on CPU it can only run in interpret mode, which checks
correctness, not speed (the column says "interpret" there). All read the same page pool, so the table
compares like with like. The "cpu" column (on CPU, when it builds) is the compiled XLA:CPU FFI kernel
(pallas_kernels/cpu/), the "auto" backend on CPU, with its speed-ups over the chunked and
gather-everything XLA versions measured in the same run. On a GPU the table also gives the kernel's
achieved bandwidth (unique KV bytes read / time) against the device's: the spec peak where the device
kind is known, and a measured device-to-device copy; on CPU the cpu column's bandwidth is put
against a read bandwidth measured in the same run (a jitted sum over 1 GiB), the ceiling of a decode
step's streaming read of the pool.

    python experiments/bench_attention.py                 # the issue's decode shape and two others
    python experiments/bench_attention.py --dtype bfloat16 --repeats 5 --output-json attn.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels import AttentionMetadata, gather_all_paged_attention, paged_attention  # noqa: E402
from pallas_kernels import cpu as cpu_attention  # noqa: E402
from pallas_kernels import ragged_paged_attention as pallas_attention  # noqa: E402
from pallas_kernels.reference import to_storage  # noqa: E402

# Spec HBM bandwidth (GB/s) by device_kind substring, for the GPU "% of peak" column.
PEAK_GB_S = {
    "H200": 4800,
    "H100 SXM": 3350,
    "H100 NVL": 3900,
    "H100 PCIe": 2000,
    "H100": 3350,
    "A100-SXM4-80GB": 2039,
    "A100-PCIE-80GB": 1935,
    "A100": 1555,
    "L40S": 864,
    "L4": 300,
    "A10G": 600,
    "V100": 900,
    "T4": 320,
}


def peak_bandwidth_gb_s(kind: str) -> float | None:
    for name, gb_s in PEAK_GB_S.items():  # most specific names first
        if name.lower() in kind.lower():
            return gb_s
    return None


def copy_bandwidth_gb_s(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Device memory bandwidth as a jitted x + 1 over `nbytes` sees it (reads + writes)."""
    x = jnp.zeros(nbytes // 4, jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    return 2 * nbytes / time_fn(f, (x,), repeats) / 1e9


def read_bandwidth_gb_s(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Memory read bandwidth as a jitted sum over `nbytes` sees it (XLA spreads it over all cores).

    The CPU kernel's decode attention is a streaming read of the pool, so this is its ceiling; on a
    shared VM it moves from run to run (8-19 GB/s on the 2-core development VM in one evening), hence
    measured in the same run.
    """
    x = jnp.ones(nbytes // 4, jnp.float32)
    return nbytes / time_fn(jax.jit(jnp.sum), (x,), repeats) / 1e9


@dataclass
class Case:
    name: str
    decode_lens: list[int]  # context length of each decode row
    prefills: list[tuple[int, int]]  # (tokens already in the pool, new query tokens) per prefill seq
    heads: tuple[int, int, int] | None = None  # (heads, kv heads, head_dim); None: the command line's


def make_cases(rng: np.random.Generator) -> list[Case]:
    return [
        # The decode shape: 32 sequences, contexts up to 1,024 tokens.
        Case("decode 32 seqs, ctx<=1024", rng.integers(512, 1025, 32).tolist(), []),
        # The ~125M benchmark model's decode step (12 q / 4 kv heads, d 64): 64 rows, contexts ~600.
        Case("125M decode 64 seqs, ctx 400-800", rng.integers(400, 801, 64).tolist(), [], (12, 4, 64)),
        # (the gather-everything baseline materialises [rows, context, heads, dim]: keep these modest)
        Case("prefill 2x256", [], [(0, 256), (0, 256)]),
        Case(
            "mixed 24 decodes (ctx<=512) + 256-token chunk", rng.integers(128, 513, 24).tolist(), [(256, 256)]
        ),
    ]


def build_step(case: Case, heads: int, kv_heads: int, head_dim: int, page: int, dtype, rng, ppc: int = 4):
    """A page pool holding every sequence's context, plus both backends' inputs for one step."""
    seqs = [(L, 1) for L in case.decode_lens] + [(p + q, q) for p, q in case.prefills]
    max_ctx = max(L for L, _ in seqs)
    pages_needed = -(-max_ctx // page)
    max_pages = -(-pages_needed // ppc) * ppc  # table width: a multiple of the chunk
    num_pages = sum(-(-L // page) for L, _ in seqs) + 1
    perm = rng.permutation(num_pages)
    tables, k = [], 0
    for L, _ in seqs:
        n = -(-L // page)
        t = np.zeros(max_pages, np.int32)
        t[:n] = perm[k : k + n]
        k += n
        tables.append(t)
    tables = np.stack(tables)
    shape = (1, kv_heads, num_pages, page, head_dim)
    k_cache = to_storage(jnp.asarray(rng.normal(size=shape), jnp.float32), dtype)
    v_cache = to_storage(jnp.asarray(rng.normal(size=shape), jnp.float32), dtype)
    D = len(case.decode_lens)
    q_rows = D + sum(q for _, q in case.prefills)
    q = jnp.asarray(rng.normal(size=(q_rows, heads, head_dim)), jnp.float32)
    Sp = max(len(case.prefills), 1)
    p_tables = np.zeros((Sp, max_pages), np.int32)
    p_ctx, p_start, p_len = (np.zeros(Sp, np.int32) for _ in range(3))
    row = 0
    for j, (pre, qn) in enumerate(case.prefills):
        p_tables[j] = tables[D + j]
        p_ctx[j], p_start[j], p_len[j] = pre + qn, row, qn
        row += qn
    meta = AttentionMetadata(
        tables[:D],
        np.asarray(case.decode_lens, np.int32),
        p_tables,
        p_ctx,
        p_start,
        p_len,
        np.int32(len(case.prefills)),
    )
    # Per-row view for the gather-everything baseline.
    tok_tables, tok_pos, tok_ctx = [], [], []
    for i, L in enumerate(case.decode_lens):
        tok_tables.append(tables[i]), tok_pos.append(L - 1), tok_ctx.append(L)
    for j, (pre, qn) in enumerate(case.prefills):
        for t in range(qn):
            tok_tables.append(tables[D + j]), tok_pos.append(pre + t), tok_ctx.append(pre + qn)
    per_row = (np.stack(tok_tables), np.asarray(tok_pos, np.int32), np.asarray(tok_ctx, np.int32))
    kv_bytes = sum(L for L, _ in seqs) * kv_heads * head_dim * 2 * jnp.dtype(k_cache.dtype).itemsize
    return q, k_cache, v_cache, meta, per_row, kv_bytes


def time_fn(fn, args, repeats: int) -> float:
    """Best seconds per call. The inputs are put on the device once (numpy metadata would otherwise
    be copied host -> device inside every timed call), and on accelerators each timing averages 10
    back-to-back calls so the host's dispatch latency is not counted as kernel time."""
    args = jax.device_put(args)
    inner = 1 if jax.default_backend() == "cpu" else 10
    jax.block_until_ready(fn(*args))  # compile + warm
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output-json", default=None)
    ap.add_argument(
        "--pallas", default="on", choices=["on", "off"], help="time the Pallas kernel (interpret mode on CPU)"
    )
    ap.add_argument(
        "--cpu", default="on", choices=["on", "off"], help="time the compiled CPU kernel (on CPU)"
    )
    args = ap.parse_args()
    storage = jnp.uint16 if args.dtype == "bfloat16" else jnp.float32
    rng = np.random.default_rng(0)
    scale = args.head_dim**-0.5
    chunked = jax.jit(lambda q, k, v, m: paged_attention(q, k, v, 0, m, scale=scale))
    gather_all = jax.jit(
        lambda q, k, v, t, p, c: gather_all_paged_attention(q, k, v, 0, t, p, c, scale=scale)
    )
    cpu = jax.jit(lambda q, k, v, m: cpu_attention.paged_attention(q, k, v, 0, m, scale=scale))
    pallas = jax.jit(lambda q, k, v, m: pallas_attention.paged_attention(q, k, v, 0, m, scale=scale))
    on_cpu = jax.default_backend() == "cpu"
    use_cpu = on_cpu and args.cpu == "on" and cpu_attention.is_available()
    if on_cpu and args.cpu == "on" and not use_cpu:
        print(f"(no cpu column: {cpu_attention.unavailable_reason()})")
    use_pallas = args.pallas == "on"
    kind = jax.devices()[0].device_kind
    rows = []
    print(
        f"device: {kind}  heads {args.heads}/{args.kv_heads}  d {args.head_dim}  "
        f"page {args.page_size}  KV {args.dtype}"
    )
    peak = copy_bw = None
    read_bw = None
    if not on_cpu:
        peak, copy_bw = peak_bandwidth_gb_s(kind), copy_bandwidth_gb_s()
        print(f"memory bandwidth: spec {peak or '?'} GB/s, measured copy {copy_bw:.0f} GB/s")
    elif use_cpu:
        read_bw = read_bandwidth_gb_s()
        print(f"memory bandwidth: measured read (jitted sum over 1 GiB) {read_bw:.1f} GB/s")
    head = "| shape | xla chunked (default) ms | xla gather-all ms | speed-up | chunked GB/s of KV read |"
    if use_cpu:
        head += " cpu kernel ms | vs chunked | vs gather-all | cpu GB/s of KV read | % of read bw |"
    if use_pallas:
        head += " pallas (interpret) ms |" if on_cpu else " pallas ms | pallas GB/s | % of spec | % of copy |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for case in make_cases(rng):
        heads, kv_heads, head_dim = case.heads or (args.heads, args.kv_heads, args.head_dim)
        scale = head_dim**-0.5  # the jitted closures read it at trace time (one trace per shape)
        q, kc, vc, meta, (tt, tp, tc), kv_bytes = build_step(
            case, heads, kv_heads, head_dim, args.page_size, storage, rng
        )
        a = chunked(q, kc, vc, meta)
        b = gather_all(q, kc, vc, tt, tp, tc)
        err = float(jnp.max(jnp.abs(a - b)))
        t_chunk = time_fn(chunked, (q, kc, vc, meta), args.repeats)
        t_all = time_fn(gather_all, (q, kc, vc, tt, tp, tc), args.repeats)
        extra = ""
        if use_cpu:
            c = cpu(q, kc, vc, meta)
            err = max(err, float(jnp.max(jnp.abs(c - a))))
            t_cpu = time_fn(cpu, (q, kc, vc, meta), args.repeats)
            extra += (
                f" {t_cpu * 1e3:.1f} | {t_chunk / t_cpu:.1f}x | {t_all / t_cpu:.1f}x | "
                f"{kv_bytes / t_cpu / 1e9:.1f} | {100 * kv_bytes / t_cpu / 1e9 / read_bw:.0f}% |"
            )
        if use_pallas:
            c = pallas(q, kc, vc, meta)
            err = max(err, float(jnp.max(jnp.abs(c - a))))
            t_pal = time_fn(pallas, (q, kc, vc, meta), args.repeats)
            pal_gb_s = kv_bytes / t_pal / 1e9
            extra += f" {t_pal * 1e3:.1f} |"
            if not on_cpu:
                pct = f"{100 * pal_gb_s / peak:.0f}%" if peak else "?"
                extra += f" {pal_gb_s:.0f} | {pct} | {100 * pal_gb_s / copy_bw:.0f}% |"
        rows.append(
            dict(
                shape=case.name,
                heads=[heads, kv_heads, head_dim],
                chunked_ms=t_chunk * 1e3,
                gather_all_ms=t_all * 1e3,
                speedup=t_all / t_chunk,
                max_abs_diff=err,
                kv_gb_per_s=kv_bytes / t_chunk / 1e9,
            )
        )
        if use_cpu:
            rows[-1].update(
                cpu_ms=t_cpu * 1e3,
                cpu_vs_chunked=t_chunk / t_cpu,
                cpu_vs_gather_all=t_all / t_cpu,
                cpu_kv_gb_per_s=kv_bytes / t_cpu / 1e9,
                cpu_pct_of_read_bandwidth=100 * kv_bytes / t_cpu / 1e9 / read_bw,
                read_bandwidth_gb_per_s=read_bw,
            )
        if use_pallas:
            rows[-1].update(pallas_ms=t_pal * 1e3, pallas_interpret=on_cpu, pallas_kv_gb_per_s=pal_gb_s)
        r = rows[-1]
        print(
            f"| {r['shape']} | {r['chunked_ms']:.1f} | {r['gather_all_ms']:.1f} | {r['speedup']:.2f}x | "
            f"{r['kv_gb_per_s']:.1f} |{extra}  (max |diff| {err:.1e})"
        )
    if args.output_json:
        out = {"args": vars(args), "device": kind, "rows": rows}
        if not on_cpu:
            out.update(spec_gb_per_s=peak, copy_gb_per_s=copy_bw)
        Path(args.output_json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
