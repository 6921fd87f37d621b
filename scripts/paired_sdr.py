"""The SDR difference between two evaluated rows, paired over the same clips, with its standard
error: whether a choice between two runs is more than the noise of the clips it is made on.

    python scripts/paired_sdr.py runs/s58/valpairs/rows/A.pairs60.6s.json \
        runs/s61/valpairs_s6/rows/B.pairs60.6s.json

Reads the per-source scores that training.evaluate keeps in its row cache. Each source's score
is grouped by the clip it comes from (training.evaluate.source_clips: a pair "a+b"'s sources are
clips a and b; an ensemble's stems share one performance) and averaged there, since a
clip recurs in several mixtures (the test pairs give each clip two partners as its own pairs,
and it is drawn as a partner too; `--partners` does the same for val pairs). The difference
A - B is then averaged over the clips, with the standard error of that mean: clips, not
mixtures, are the independent draws.

`--top N` lists the N clips whose differences are largest in size, each with its share of the
mean over clips and of the row's own mean over sources (a clip recurs in 2-9 of the test pairs'
sources, so the row weighs clips unevenly), and the mean again without them: whether a
difference is spread over the clips or carried by a few (docs/RESULTS.md section 64: one test
clip whose detected crop misleads Sound-of-Pixels carries ~0.6 dB of the rows' detector-named
margin).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.evaluate import read_per_source, source_clips  # noqa: E402


def clip_sdrs(path: Path) -> dict[str, list[float]]:
    """A row cache -> {clip: the SDR of every scored source cut from it, over every mixture}."""
    per_source = read_per_source(path)
    clips: dict[str, list[float]] = {}
    for clip, (_name, _cls, sdr, *_) in zip(source_clips(per_source), per_source, strict=True):
        clips.setdefault(clip, []).append(sdr)
    return clips


def per_clip(path: Path) -> dict[str, float]:
    """A row cache -> {clip: mean SDR of the sources cut from it, over every mixture}."""
    return {name: float(np.mean(v)) for name, v in clip_sdrs(path).items()}


def differences(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """{clip: a - b} over the clips of two rows of one evaluation set."""
    if sorted(a) != sorted(b):
        raise SystemExit(f"error: the rows cover different clips ({len(a)} against {len(b)}, "
                         f"{len(set(a) ^ set(b))} not in both): compare rows of one evaluation set")
    return {k: a[k] - b[k] for k in sorted(a)}


def summary(diffs: dict[str, float]) -> dict[str, float]:
    """Mean of per-clip differences, its standard error, and the clip count."""
    if len(diffs) < 2:
        raise SystemExit("error: a standard error needs at least two clips")
    d = np.array(list(diffs.values()))
    return {"diff": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d))),
            "n": len(d)}


def paired(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Mean of a - b over their clips, its standard error, and the clip count."""
    return summary(differences(a, b))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="row cache of training.evaluate (<out>/rows/*.json)")
    ap.add_argument("b", type=Path, help="another row cache on the same clips")
    ap.add_argument("--top", type=int, default=0, metavar="N",
                    help="also list the N clips with the largest differences (either sign) "
                         "and the mean without them")
    args = ap.parse_args(argv)
    if args.top < 0:
        ap.error(f"--top {args.top}: expected a count >= 0")
    sdrs_a = clip_sdrs(args.a)
    diffs = differences({k: float(np.mean(v)) for k, v in sdrs_a.items()}, per_clip(args.b))
    r = summary(diffs)
    print(f"{args.a.stem} - {args.b.stem}: {r['diff']:+.3f} dB SDR, standard error "
          f"{r['se']:.3f} over {r['n']} clips")
    if args.top:
        counts = {k: len(v) for k, v in sdrs_a.items()}
        n_sources = sum(counts.values())
        top = sorted(diffs, key=lambda k: -abs(diffs[k]))[:args.top]
        for k in top:
            print(f"  {k}: {diffs[k]:+.2f} dB ({diffs[k] / len(diffs):+.3f} of the mean over "
                  f"clips; {counts[k]} sources, {diffs[k] * counts[k] / n_sources:+.3f} of the "
                  f"row's mean over {n_sources} sources)")
        rest = summary({k: v for k, v in diffs.items() if k not in top})
        print(f"  without these {len(top)}: {rest['diff']:+.3f} dB SDR, standard error "
              f"{rest['se']:.3f} over {rest['n']} clips")
    return 0


if __name__ == "__main__":
    sys.exit(main())
