"""Run every benchmark in bench/ and rewrite docs/benchmarks.md with their numbers.

    OMP_NUM_THREADS=1 python bench/run_all.py [--dry-run] [--full] [--only NAME ...] [--timeout 300] [-o docs/benchmarks.md]

Each bench_*.py / *.py script here (except this one) runs in its own process with its quick flags (QUICK; --full
drops them), at most --timeout seconds. Its printed lines are collected; lines with a ratio ("ratio", "÷", " vs ")
are listed first in the report. The report records machine (CPU model, cores, torch version) and date. Run it on
an otherwise idle machine: the numbers are timings.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(REPO, "docs", "benchmarks.md")

# quick flags per script (keep each run ≤ 5 min on 2 CPU cores); --full runs the scripts' defaults
QUICK = {
    "bench_mae.py": ["--size", "64", "--reps", "3"],
    # bench_masks.py: defaults (the 112-slice CT at 1.5 mm, the SLIC goal; ~3.5 min)
    "bench_mass_model.py": ["--configs", "tiny,mid", "--reps", "2"],
    "bench_mass_sampler.py": ["--rounds", "3"],
    # bench_sam2_cost.py: defaults (30-slice CT, ~1.5 min)
    "step_overhead.py": ["--reps", "3"],
}
RATIO = re.compile(r"\bratio\b|÷|/stock| vs |×|PSNR| per real CT|per slice|random read", re.IGNORECASE)


def scripts() -> list:
    me = os.path.basename(__file__)
    return sorted(f for f in os.listdir(HERE) if f.endswith(".py") and f != me and not f.startswith("_"))


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torch

        tv = torch.__version__
    except ImportError:
        tv = "not installed"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"cpu": cpu, "cores": cores, "torch": tv, "python": platform.python_version(),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "host": platform.node()}


def run_one(name: str, full: bool, timeout: int) -> dict:
    cmd = [sys.executable, os.path.join(HERE, name)] + ([] if full else QUICK.get(name, []))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
        out, rc = r.stdout, r.returncode
        err = r.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = f"timed out after {timeout} s", "timeout"
    lines = [ln.rstrip() for ln in out.splitlines() if ln.strip()]
    return {"name": name, "cmd": "OMP_NUM_THREADS=1 python " + " ".join(["bench/" + name] + cmd[2:]),
            "rc": rc, "seconds": time.time() - t0, "lines": lines,
            "ratios": [ln for ln in lines if RATIO.search(ln)], "stderr_tail": err.strip().splitlines()[-5:]}


def render(results: list, m: dict) -> str:
    md = ["# Benchmarks", "",
          "Written by `bench/run_all.py` (rerun it to refresh this page; timings need an idle machine).", "",
          f"- date: {m['date']}", f"- machine: {m['cpu']}, {m['cores']} usable cores ({m['host']})",
          f"- torch {m['torch']}, python {m['python']}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}", "",
          "## Ratios", "", "| benchmark | result |", "|---|---|"]
    for r in results:
        for ln in r["ratios"] or ["(no ratio printed)" if r["rc"] == 0 else f"FAILED ({r['rc']})"]:
            md.append(f"| {r['name']} | {ln.replace('|', '/')} |")
    md += ["", "## Full output", ""]
    for r in results:
        md += [f"### {r['name']}", "", f"`{r['cmd']}` — exit {r['rc']}, {r['seconds']:.0f} s", "", "```"]
        md += r["lines"] or ["(no output)"]
        if r["rc"] != 0:
            md += ["--- stderr (tail) ---"] + r["stderr_tail"]
        md += ["```", ""]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list the commands, run nothing, write nothing")
    p.add_argument("--full", action="store_true", help="run each script with its own defaults (slower)")
    p.add_argument("--only", nargs="+", default=None, help="script names (with or without .py)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per script (default 300)")
    p.add_argument("-o", "--output", default=DEFAULT_OUT)
    a = p.parse_args(argv)
    names = scripts()
    if a.only:
        want = {n if n.endswith(".py") else n + ".py" for n in a.only}
        unknown = want - set(names)
        if unknown:
            print(f"ERROR: --only {sorted(unknown)}: no such bench script (have {names}).", file=sys.stderr)
            return 2
        names = [n for n in names if n in want]
    if a.dry_run:
        for n in names:
            print("OMP_NUM_THREADS=1 python " + " ".join(["bench/" + n] + ([] if a.full else QUICK.get(n, []))))
        return 0
    m = machine()
    results = []
    for n in names:
        print(f"== {n} ...", flush=True)
        r = run_one(n, a.full, a.timeout)
        results.append(r)
        print(f"   exit {r['rc']}, {r['seconds']:.0f} s" + "".join(f"\n   {ln}" for ln in r["ratios"]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    tmp = a.output + ".tmp"
    with open(tmp, "w") as f:
        f.write(render(results, m))
    os.replace(tmp, a.output)
    print(f"wrote {a.output}")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
