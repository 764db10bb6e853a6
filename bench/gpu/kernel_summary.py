"""Sums the kernel times of an Nsight Compute CSV log (`ncu --csv --metrics
gpu__time_duration.sum --log-file F`) by kernel name and prints the largest, with counts.

Usage: python3 kernel_summary.py ncu.csv [top]
"""

import collections
import csv
import sys

UNITS = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0,
         "s": 1e3, "second": 1e3}


def main() -> int:
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    lines = [l for l in open(path, errors="replace") if l.startswith('"')]
    rows = list(csv.DictReader(lines))
    total = collections.Counter()
    count = collections.Counter()
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = r.get("Kernel Name", "?")
        # Templated names: keep the part before the argument list.
        short = name.split("(")[0][:90]
        value = float(r["Metric Value"].replace(",", ""))
        total[short] += value * UNITS.get(r.get("Metric Unit", "ns").strip(), 1e-6)
        count[short] += 1
    all_ms = sum(total.values())
    print(f"{sum(count.values())} kernels, {all_ms:.2f} ms of GPU time")
    print(f"{'ms':>9} {'%':>5} {'count':>6} {'us/launch':>9}  kernel")
    for name, ms in total.most_common(top):
        print(f"{ms:9.3f} {100 * ms / max(all_ms, 1e-9):5.1f} {count[name]:6d} "
              f"{1e3 * ms / count[name]:9.1f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
