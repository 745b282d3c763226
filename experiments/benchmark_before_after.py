#!/usr/bin/env python
"""Throughput of this checkout against an older one, in one run: did a change cost speed?

Runs ``experiments/benchmark_throughput.py --engines pagedjax`` alternately from a ``--before``
checkout (e.g. a ``git worktree`` of the commit before a refactor) and from this one, ``--rounds``
times each (before, after, before, after, ...), so a machine that drifts slows both alike. Every
run is a fresh process on the same workload; the report gives each run's total tok/s, the medians,
the after/before ratio of the medians and the ratio pair by pair, as JSON and a PNG.

    git worktree add /tmp/before HEAD~3
    python experiments/benchmark_before_after.py --before /tmp/before --rounds 2 -- --num-prompts 200

Arguments after ``--`` go to ``benchmark_throughput.py`` unchanged (both checkouts must accept
them). Each checkout's script puts its own checkout first on ``sys.path``, so the same interpreter
runs each checkout's own engine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def run_once(checkout: Path, bench_args: list[str], log) -> dict:
    """One fresh benchmark process in `checkout`; its pagedjax result as a dict."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(checkout / "experiments" / "benchmark_throughput.py")]
        cmd += ["--engines", "pagedjax", "--check-n", "0", *bench_args, "--output-json", str(out)]
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=checkout)
        doc = json.loads(out.read_text())
    (res,) = [r for r in doc["results"] if r["engine"] == "pagedjax"]
    if res.get("error"):
        raise RuntimeError(f"{checkout}: {res['error']}")
    after_timed = (res.get("metrics") or {}).get("after_timed") or {}
    return {
        "total_tok_per_s": res["total_tok_per_s"],
        "output_tok_per_s": res["output_tok_per_s"],
        "elapsed_s": res["elapsed_s"],
        "load_s": res.get("load_s"),  # model load + warm-up compiles (start-up)
        "num_compiles": after_timed.get("num_compiles"),
        "workload": doc["workload"],
    }


def git_head(checkout: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "?"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, side in enumerate(("before", "after")):
        vals = [r["total_tok_per_s"] for r in report["runs"][side]]
        ax.scatter([i] * len(vals), vals, color=("#8c8c8c", "#4C72B0")[i], zorder=3)
        ax.bar(i, statistics.median(vals), 0.5, color=("#cfcfcf", "#a9bfe0")[i])
    ax.set_xticks([0, 1], [f"before\n{report['before_commit']}", f"after\n{report['after_commit']}"])
    ax.set_ylabel("total tok/s (bars: median; dots: runs)")
    ax.set_title(f"after / before = {report['ratio_of_medians']:.3f} ({report['cpu']})", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, type=Path, help="the older checkout (a git worktree)")
    p.add_argument(
        "--after",
        type=Path,
        default=HERE.parent,
        help="the newer checkout (default: this one; give a "
        "worktree of a commit when this one is being edited during the run)",
    )
    p.add_argument("--rounds", type=int, default=2, help="runs of each checkout, alternating")
    p.add_argument("--output-json", type=Path, default=RESULTS / "before_after.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "before_after.png")
    p.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "before_after.log")
    args = p.parse_args(own)
    after = args.after.resolve()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with open(args.log, "w") as log:
        for i in range(args.rounds):
            for side, checkout in (("before", args.before.resolve()), ("after", after)):
                t0 = time.time()
                runs[side].append(run_once(checkout, bench_args, log))
                r = runs[side][-1]
                rate, took = r["total_tok_per_s"], time.time() - t0
                print(f"round {i + 1} {side:6s} {rate:8.1f} total tok/s ({took:.0f} s)")
    med = {s: statistics.median(r["total_tok_per_s"] for r in runs[s]) for s in runs}
    startup = {s: statistics.median(r["load_s"] for r in runs[s] if r["load_s"] is not None) for s in runs}
    compiles = {s: sorted({r["num_compiles"] for r in runs[s]}, key=str) for s in runs}
    pairs = [
        a["total_tok_per_s"] / b["total_tok_per_s"]
        for a, b in zip(runs["after"], runs["before"], strict=True)
    ]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_name(),
        "before_commit": git_head(args.before),
        "after_commit": git_head(after),
        "benchmark_args": bench_args,
        "workload": runs["after"][0]["workload"],
        "runs": runs,
        "median_total_tok_per_s": med,
        "ratio_of_medians": med["after"] / med["before"],
        "ratios_pair_by_pair": pairs,
        "median_startup_s": startup,
        "num_compiles": compiles,
    }
    for side in runs:
        for r in runs[side]:
            r.pop("workload", None)
    args.output_json.parent.mkdir(parents=True, exist_ok=True)
    args.output_json.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.plot)
    print(f"median total tok/s: before {med['before']:.1f}, after {med['after']:.1f}")
    print(f"after / before: {report['ratio_of_medians']:.3f} (pairs: {', '.join(f'{x:.3f}' for x in pairs)})")
    print(f"start-up (load + warm-up) median s: {startup}; compiles: {compiles}")
    print(f"wrote {args.output_json} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
