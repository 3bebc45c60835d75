"""Peak RSS of ``probe.record`` as the text grows: it must stay flat (bounded by the chunk).

    python benchmarks/record_memory.py [--sizes 200000,1000000,2000000] [--kinds h,c] [--grad]

Each size runs in a fresh subprocess (peak RSS is per process) on zoo:lstm-linux over the shipped
C sample repeated to length, writes the Run to a temporary directory and deletes it after. The
first row is the baseline: the other rows print their RSS against it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
from rnnscope import probe, zoo
n, kinds, grad, out = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3] == "1", sys.argv[4]
base = (zoo.SAMPLES / "linux.c").read_text()
text = (base * (n // len(base) + 1))[:n]
ck = zoo.load("zoo:lstm-linux")
t = time.perf_counter()
run = probe.record(ck, text, out, kinds=kinds, grad=grad, progress=False)
secs = time.perf_counter() - t
disk = sum(f.stat().st_size for f in run.path.rglob("*") if f.is_file())
print(json.dumps({"chars": n, "seconds": secs, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "disk_mb": disk / 1e6}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="200000,1000000,2000000")
    ap.add_argument("--kinds", default="h,c")
    ap.add_argument("--grad", action="store_true")
    args = ap.parse_args()
    rows = []
    for n in map(int, args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as d:
            proc = subprocess.run([sys.executable, "-c", CHILD, str(n), args.kinds, "1" if args.grad else "0",
                                   f"{d}/run"], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r, base = rows[-1], rows[0]
        print(f"{r['chars']:>10,d} chars  {r['seconds']:7.1f} s  {r['chars'] / r['seconds']:8,.0f} ch/s  "
              f"peak RSS {r['peak_rss_mb']:7.1f} MB ({r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x first)  "
              f"run on disk {r['disk_mb']:8.1f} MB", flush=True)


if __name__ == "__main__":
    main()
