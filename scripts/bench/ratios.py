#!/usr/bin/python3
"""Side-by-side ratios from a bench.sh result directory.

Usage: ratios.py DIR OURS=THEIRS...   (e.g. ours-memory=nbdkit-memory)
Prints, per transport and test, the medians of both servers and the ratio
ours/theirs for throughput (MiB/s or IOPS, higher is better), server CPU
per GiB or per request (lower is better) and, for copies, the time.
"""
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
        cpu = []
        for r in rs:
            c, b = num(r["srv_cpu_s"]), num(r["bytes"])
            if c is None or not b:
                continue
            cpu.append(c / (b / 4096) * 1e6 if small else c / (b / GIB))
        return thr, med(cpu), copy, small

    def ratio(a, b):
        return "-" if a is None or b is None or b == 0 else "%.2f×" % (a / b)

    tests = sorted({k[2] for k in by}, key=lambda t: (not t.startswith("copy"), t))
    for ours, theirs in pairs:
        for tr in sorted({k[1] for k in by}):
            print(f"\n### {ours} vs {theirs} ({tr})\n")
            print("| test | ours | theirs | ratio | ours CPU | theirs CPU | CPU ratio |")
            print("|---|---|---|---|---|---|---|")
            for t in tests:
                a, b = figures(ours, tr, t), figures(theirs, tr, t)
                if not a or not b:
                    continue
                unit = "s" if a[2] else ("IOPS" if a[3] else "MiB/s")
                cunit = "µs/req" if a[3] else "s/GiB"
                print(f"| {t} | {a[0]:.2f} {unit} | {b[0]:.2f} {unit} | {ratio(a[0], b[0])} | "
                      f"{a[1] or 0:.3f} {cunit} | {b[1] or 0:.3f} {cunit} | {ratio(a[1], b[1])} |")


if __name__ == "__main__":
    main()
