#!/usr/bin/python3
"""Side-by-side ratios from a bench.sh result directory.

Usage: ratios.py DIR OURS=THEIRS...   (e.g. ours-memory=nbdkit-memory)
Prints, per transport and test, the medians of both servers and the ratio
ours/theirs for throughput (MiB/s or IOPS, higher is better), server CPU
per GiB or per request (lower is better) and, for copies, the time; the
client's CPU per GiB or per request beside it, and how busy the client was
(its CPU time over the test's time, against the cores it may use: env.txt's
client_cores). A job where the client used >= 95 % of its cores with either
server is marked "client-bound": the client sets the pace, so the verdict
is the server CPU ratio, not the throughput ratio.
"""
import os
import re
import csv
import statistics
import sys
from collections import defaultdict

GIB = 2 ** 30


def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def main():
    out_dir, pairs = sys.argv[1], [p.split("=", 1) for p in sys.argv[2:]]
    cores = 1.0
    env = f"{out_dir}/env.txt"
    if os.path.exists(env):
        m = re.search(r"^client_cores: (\d+)", open(env).read(), re.M)
        if m:
            cores = float(m.group(1))
    rows = list(csv.DictReader(open(f"{out_dir}/results.tsv"), delimiter="\t"))
    by = defaultdict(list)
    for r in rows:
        by[(r["server"], r["transport"], r["test"])].append(r)

    def figures(server, tr, test):
        rs = by.get((server, tr, test), [])
        if not rs:
            return None
        copy = test.startswith("copy")
        small = "-4k-" in test
        thr = med([num(r["secs"]) if copy else num(r["iops"] if small else r["mibs"]) for r in rs])
        cpu, cli, busy = [], [], []
        for r in rs:
            c, b, k, t = num(r["srv_cpu_s"]), num(r["bytes"]), num(r["cli_cpu_s"]), num(r["secs"])
            if not b:
                continue
            per = (b / 4096) / 1e6 if small else b / GIB
            if c is not None:
                cpu.append(c / per)
            if k is not None:
                cli.append(k / per)
                if t:
                    busy.append(k / t / cores)
        return thr, med(cpu), copy, small, med(cli), med(busy)

    def ratio(a, b):
        return "-" if a is None or b is None or b == 0 else "%.2f×" % (a / b)

    tests = sorted({k[2] for k in by}, key=lambda t: (not t.startswith("copy"), t))
    for ours, theirs in pairs:
        for tr in sorted({k[1] for k in by}):
            if not any(figures(ours, tr, t) and figures(theirs, tr, t) for t in tests):
                continue
            print(f"\n### {ours} vs {theirs} ({tr})\n")
            print("| test | ours | theirs | ratio | ours CPU | theirs CPU | CPU ratio "
                  "| client CPU, ours / theirs | client busy, ours / theirs | verdict |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for t in tests:
                a, b = figures(ours, tr, t), figures(theirs, tr, t)
                if not a or not b:
                    continue
                unit = "s" if a[2] else ("IOPS" if a[3] else "MiB/s")
                cunit = "µs/req" if a[3] else "s/GiB"
                bound = max(a[5] or 0, b[5] or 0) >= 0.95
                verdict = "client-bound: CPU ratio" if bound else "throughput"
                print(f"| {t} | {a[0]:.2f} {unit} | {b[0]:.2f} {unit} | {ratio(a[0], b[0])} | "
                      f"{a[1] or 0:.3f} {cunit} | {b[1] or 0:.3f} {cunit} | {ratio(a[1], b[1])} | "
                      f"{a[4] or 0:.3f} / {b[4] or 0:.3f} {cunit} | "
                      f"{(a[5] or 0) * 100:.0f} % / {(b[5] or 0) * 100:.0f} % | {verdict} |")


if __name__ == "__main__":
    main()
