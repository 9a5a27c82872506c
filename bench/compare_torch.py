"""jaxdiff against openai/guided-diffusion's PyTorch on this machine, alternating runs; prints JSON.

    python bench/compare_torch.py [--rounds 2] [--batches 16,64] [--torch-env "GLIBC_TUNABLES=..."] [--markdown]

Each round runs, one after another in fresh processes: bench_training.py (fixture-A U-Net step),
bench_sampling.py per batch, and bench_torch_reference.py (which checks its PyTorch model
against the guided-diffusion fixture before timing). Alternating whole runs spreads this VM's
slow and fast spells over both sides. Reported per quantity: the median over rounds of each
run's median, jaxdiff / PyTorch (same run) and jaxdiff / the issue's PyTorch figures.
`--torch-env` adds environment variables to the PyTorch runs only: jaxdiff's scripts start with
the huge-page malloc (`jaxdiff.cpu.use_huge_page_malloc`), and PyTorch gains from it as much
(b64 training step ~15 % faster here), so `--torch-env GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
compares on equal terms. bench/interleaved_torch.py alternates the two training steps within one
process instead (same malloc, same machine state).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from common import ROOT, machine

# openai/guided-diffusion, fixture-A architecture, PyTorch 2.13 on 2 threads (medians, ms), as
# given in the issue
ISSUE_FIGURES = {
    16: {"unet_forward": 265, "guidance_gradient": 230, "classifier_guided_ddim_step": 388, "train_step": 735},
    64: {"unet_forward": 1000, "guidance_gradient": 513, "classifier_guided_ddim_step": 1612, "train_step": 3609},
}
# jaxdiff's name for each quantity: (script, key)
JAXDIFF_KEYS = {"unet_forward": ("sampling", "unet_forward_ms"), "guidance_gradient": ("sampling", "guidance_gradient_ms"),
                "classifier_guided_ddim_step": ("sampling", "step_classifier_ms"),
                "train_step": ("training", "ms_per_step_median")}


def _run(args: list, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout[out.stdout.index("{"):])


def one_round(batches: list, torch_env: dict) -> dict:
    """{batch: {"jaxdiff": {quantity: ms}, "torch": {quantity: ms}}} of one round."""
    res = {b: {"jaxdiff": {}, "torch": {}} for b in batches}
    train = _run(["bench/bench_training.py", "--batches", ",".join(map(str, batches)), "--iters", "5",
                  "--which", "fixture_a_unet"])
    for r in train["results"]:
        res[r["batch"]]["jaxdiff"]["train_step"] = r["ms_per_step_median"]
    for b in batches:
        s = _run(["bench/bench_sampling.py", "--batch", str(b), "--repeats", "5", "--steps", "3"])
        for q, (src, key) in JAXDIFF_KEYS.items():
            if src == "sampling":
                res[b]["jaxdiff"][q] = s[key]
    t = _run(["bench/bench_torch_reference.py", "--batch", ",".join(map(str, batches)), "--repeats", "5", "--ema"],
             torch_env)
    for r in t["results"]:
        res[r["batch"]]["torch"] = {q: r[f"{q}_ms"] for q in ISSUE_FIGURES[16]}
    return res


def summarise(rounds: list, batches: list) -> dict:
    table = {}
    for b in batches:
        rows = {}
        for q in ISSUE_FIGURES[16]:
            j = statistics.median(r[b]["jaxdiff"][q] for r in rounds)
            t = statistics.median(r[b]["torch"][q] for r in rounds)
            issue = ISSUE_FIGURES.get(b, {}).get(q)
            rows[q] = {"jaxdiff_ms": round(j, 1), "torch_same_run_ms": round(t, 1), "ratio_same_run": round(j / t, 3),
                       "torch_issue_ms": issue, "ratio_issue": round(j / issue, 3) if issue else None}
        table[b] = rows
    return table


def markdown(table: dict) -> str:
    lines = []
    for b, rows in table.items():
        lines += [f"| batch {b} | jaxdiff | PyTorch, same run | ratio | PyTorch, issue | ratio |", "|---|---|---|---|---|---|"]
        for q, r in rows.items():
            lines.append(f"| {q.replace('_', ' ')} | {r['jaxdiff_ms']:.0f} | {r['torch_same_run_ms']:.0f} | "
                         f"{r['ratio_same_run']:.2f} | {r['torch_issue_ms']} | {r['ratio_issue']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batches", default="16,64")
    p.add_argument("--torch-env", default="", help="space-separated NAME=VALUE pairs for the PyTorch runs only")
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown (stderr)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    batches = [int(v) for v in args.batches.split(",") if v.strip()]
    bad = [b for b in batches if b <= 0]
    if bad or not batches:
        p.error(f"--batches must be positive integers, got {args.batches!r}")
    torch_env = dict(kv.split("=", 1) for kv in args.torch_env.split()) if args.torch_env else {}
    start = machine()
    rounds = []
    for i in range(args.rounds):
        rounds.append(one_round(batches, torch_env))
        print(json.dumps({"round": i, "result": rounds[-1]}), file=sys.stderr, flush=True)
    table = summarise(rounds, batches)
    print(json.dumps({"benchmark": "jaxdiff vs guided-diffusion PyTorch", "machine_at_start": start,
                      "load_average_at_end": list(os.getloadavg()), "torch_env": torch_env,
                      "rounds": rounds, "table": table}, indent=1))
    if args.markdown:
        print(markdown(table), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
