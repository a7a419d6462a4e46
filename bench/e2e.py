"""End to end: requests through rollwire from another process vs the hf engine called directly.
The benchmark lives in the package (``rollwire bench`` runs it too); see rollwire/bench.py.

    python bench/e2e.py [--quick] [--repeats 3] [--out bench/out/e2e.json]
"""

from __future__ import annotations

import argparse
import sys

from rollwire.bench import add_bench_args, run_bench

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    add_bench_args(ap)
    sys.exit(run_bench(ap.parse_args()))
