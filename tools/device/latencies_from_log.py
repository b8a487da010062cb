"""Device measurement helper: the distinct control latencies an engine logged in its
status lines (`... running ... latency N ms`), and their median after the first two.

    python tools/device/latencies_from_log.py run.log
"""

import re
import statistics
import sys


def main() -> None:
    vals: list[float] = []
    with open(sys.argv[1], encoding="utf-8", errors="replace") as f:
        for line in f:
            m = re.search(r"latency\s+([\d.]+) ms", line)
            if m and "running" in line:
                v = float(m.group(1))
                if not vals or vals[-1] != v:
                    vals.append(v)
    print("latencies ms:", vals)
    if len(vals) > 2:
        v = vals[2:]
        print("n", len(v), "median", statistics.median(v), "max", max(v))


if __name__ == "__main__":
    main()
