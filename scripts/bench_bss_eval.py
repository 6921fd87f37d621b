"""BSS-eval's cost as the training's validation pays it: mir_eval's bss_eval_sources (through
training.metrics.bss_eval) against training.metrics.bss_eval_shared, which factorises the
references' Gram matrix once per mixture instead of once per source. Ratios in one run: the
two alternate within every round on the same signals, so load from other programs hits both.

    .venv/bin/python scripts/bench_bss_eval.py [--rounds 7] [--samples 16128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.metrics import bss_eval, bss_eval_shared  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--samples", type=int, default=16128,
                    help="samples per source (default 16128: one 64-frame val window)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # mir_eval's deprecation notice
    rng = np.random.default_rng(0)
    print(f"{args.samples} samples per source, median [min - max] of {args.rounds} rounds")
    for k in (2, 3):
        refs = rng.standard_normal((k, args.samples))
        est = refs + 0.3 * refs[::-1] + 0.1 * rng.standard_normal(refs.shape)
        times: dict[str, list[float]] = {"mir_eval": [], "shared": []}
        worst = 0.0
        for _ in range(args.rounds):
            for name, fn in (("mir_eval", bss_eval), ("shared", bss_eval_shared)):
                t0 = time.perf_counter()
                out = fn(refs, est)
                times[name].append(1e3 * (time.perf_counter() - t0))
                if name == "mir_eval":
                    want = out
                else:
                    worst = max(worst, max(float(np.abs(out[m] - want[m]).max())
                                           for m in ("sdr", "sir", "sar")))
        med = {n: statistics.median(v) for n, v in times.items()}
        for n, v in times.items():
            print(f"K={k} {n:9s} {med[n]:7.1f} ms [{min(v):6.1f} - {max(v):6.1f}]")
        print(f"K={k} shared is x{med['mir_eval'] / med['shared']:.2f} faster; largest "
              f"difference {worst:.1e} dB")


if __name__ == "__main__":
    main()
