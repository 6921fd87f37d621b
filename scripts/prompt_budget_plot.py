"""How much of the network must train for a new class: held-out SDR, as a share of a fully
trained model's on the same test pairs, against the fraction of parameters fine-tuned (prompt
rows only, the query side, the audio U-Net, everything), one point per fine-tuned checkpoint.

    python scripts/prompt_budget_plot.py --out docs/figures/prompt_budget.png \
        runs/prompts_*/eval_*/results.json

Reads the results of `python -m training.prompts evaluate`: every row that records a fine-tuning
mode becomes a point; the reference is the row named by --ref, found in any results file with
the same held-out classes. Prints the points as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MARKERS = {"prompt": "o", "decoder": "s", "unet": "^", "full": "D"}


def collect(paths: list[Path], ref: str) -> list[dict]:
    """One dict per fine-tuned row: held-out classes, mode, trained fraction, SDR, % of ref."""
    results = [json.loads(p.read_text()) for p in paths]
    refs: dict[tuple[str, ...], float] = {}
    for r in results:
        if ref in r["rows"]:
            refs[tuple(r["held_out"])] = r["rows"][ref]["held_out"]["sdr"]
    points, seen = [], set()
    for r in results:
        held = tuple(r["held_out"])
        for row in r["rows"].values():
            if "mode" not in row:
                continue  # a pre-trained or fully trained row, or one scored before modes were kept
            if held not in refs:
                raise SystemExit(f"error: no row {ref!r} for held-out {list(held)} in the files "
                                 "given (add an evaluation that scores it)")
            if row["checkpoint"] in seen:  # the same checkpoint scored twice: one point
                continue
            seen.add(row["checkpoint"])
            sdr = row["held_out"]["sdr"]
            points.append({"held_out": list(held), "mode": row["mode"],
                           "fraction": row["trainable"] / row["total"], "sdr": sdr,
                           "share": sdr / refs[held], "checkpoint": row["checkpoint"]})
    return points


def plot(points: list[dict], ref: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({len(p["held_out"]) for p in points})
    colours = dict(zip(sizes, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for p in points:
        ax.scatter(100 * p["fraction"], 100 * p["share"], marker=MARKERS.get(p["mode"], "x"),
                   color=colours[len(p["held_out"])], alpha=0.8)
    ax.axhline(75, color="grey", linestyle="--", linewidth=1)
    ax.text(0.1, 75.5, "issue target: 75 %", color="grey", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters fine-tuned (% of the network, log scale)")
    ax.set_ylabel(f"held-out SDR, % of {ref}")
    handles = [plt.Line2D([], [], linestyle="", marker=MARKERS[m], color="black", label=m)
               for m in MARKERS if any(p["mode"] == m for p in points)]
    handles += [plt.Line2D([], [], linestyle="", marker="o", color=colours[n],
                           label=f"{n} held-out class{'es' if n > 1 else ''}") for n in sizes]
    ax.legend(handles=handles, fontsize=8, loc="upper center")  # the empty middle
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+",
                    help="results.json files of `python -m training.prompts evaluate`")
    ap.add_argument("--ref", default="full (fp32 seed 2, this machine)",
                    help="label of the fully trained reference row (default %(default)r)")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = ap.parse_args(argv)
    for p in args.results:
        if not p.is_file():
            raise SystemExit(f"error: no results file {p}")
    points = collect(args.results, args.ref)
    if not points:
        raise SystemExit("error: no fine-tuned rows in these files (rows scored before "
                         "training.prompts kept the mode: evaluate them again)")
    print("| held-out | mode | fine-tuned | held-out SDR | % of reference |")
    print("|---|---|---:|---:|---:|")
    for p in sorted(points, key=lambda p: (len(p["held_out"]), p["fraction"], p["checkpoint"])):
        print(f"| {','.join(p['held_out'])} | {p['mode']} | {100 * p['fraction']:.4g} % | "
              f"{p['sdr']:.2f} | {100 * p['share']:.0f} % |")
    plot(points, args.ref, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
