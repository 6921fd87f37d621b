"""Test-pair SDR split by whether the source's own video also shows a silent instrument
(SynthMUSIC draws one in a quarter of the solo clips): where an object-level visual front end
should matter, since a whole frame holds both instruments.

    python scripts/silent_extra_breakdown.py --data data/synth \
        runs/results_x/rows/ROW.pairs120.6s.json [more rows ...]

Reads the per-source scores that training.evaluate keeps in its row cache and each clip's
generation record (<data>/meta/<class>/<clip_id>.json, field "silent_extra").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.evaluate import read_per_source, source_clips  # noqa: E402


def has_silent_extra(data: Path, class_name: str, clip_id: str) -> bool:
    meta = data / "meta" / class_name / f"{clip_id}.json"
    if not meta.is_file():
        raise SystemExit(f"error: no generation record {meta} (a SynthMUSIC dataset?)")
    return json.loads(meta.read_text()).get("silent_extra") is not None


def breakdown(data: Path, per_source: list[list]) -> dict[str, dict[str, float]]:
    """per_source rows [pair name "a+b", class, SDR, SIR, SAR] -> mean SDR and count with and
    without a silent extra in that source's video."""
    groups: dict[str, list[float]] = {"with silent extra": [], "without": []}
    for own, (_name, cls, sdr, *_) in zip(source_clips(per_source), per_source, strict=True):
        key = "with silent extra" if has_silent_extra(data, cls, own) else "without"
        groups[key].append(sdr)
    return {k: {"sdr": float(np.mean(v)) if v else float("nan"), "n": len(v)}
            for k, v in groups.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="SynthMUSIC root")
    ap.add_argument("rows", type=Path, nargs="+",
                    help="row caches of training.evaluate on test pairs (<out>/rows/*.pairs*.json)")
    args = ap.parse_args(argv)
    print("| row | SDR, source with a silent extra (n) | SDR, without (n) |\n|---|---:|---:|")
    for path in args.rows:
        b = breakdown(args.data, read_per_source(path))
        w, wo = b["with silent extra"], b["without"]
        print(f"| {path.stem} | {w['sdr']:.2f} ({w['n']}) | {wo['sdr']:.2f} ({wo['n']}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
