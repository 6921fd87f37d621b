"""Figures for docs/RESULTS.md: a spectrogram / mask panel of one test pair (mixture, each
source, the ideal ratio mask and a trained separator's mask per query).

    python -m training.figures --data data/synth --ckpt runs/iquery/best --out docs/figures
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import load_checkpoint
from models.spectral import stft, warp
from training.evaluate import load_items, query_from
from training.instruments import load_vocabulary
from training.separate import separate_masks


def mask_panel(ckpt: Path, data: Path, out: Path, pair_index: int = 0) -> Path:
    """Write <out>/masks_pair<i>.png; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [i.name for i in load_vocabulary()]
    model, _ = load_checkpoint(ckpt)
    pairs, _ = load_items(data, 6.0, None, 0)
    item = pairs[pair_index]
    rows = model.n_rows
    spec = stft(torch.from_numpy(item["mix"]).float())
    queries = [query_from(s, names, c) for s, c in zip(item["gt"], item["classes"],
                                                       strict=True)]
    masks = separate_masks(model, spec, queries).numpy()  # (2, rows, T)
    src = warp(stft(torch.from_numpy(item["refs"]).float()).abs()[None], rows)[0].numpy()
    mix = warp(spec.abs()[None, None], rows)[0, 0].numpy()
    ideal = src / np.maximum(src.sum(0, keepdims=True), 1e-8)
    fig, ax = plt.subplots(3, 3, figsize=(12, 8), constrained_layout=True)
    show = {(0, 0): (np.log1p(mix), "mixture |S| (log)"),
            (0, 1): (np.log1p(src[0]), f"{item['classes'][0]} |S| (log)"),
            (0, 2): (np.log1p(src[1]), f"{item['classes'][1]} |S| (log)"),
            (1, 1): (ideal[0], "ideal ratio mask"), (1, 2): (ideal[1], "ideal ratio mask"),
            (2, 1): (masks[0], "iQuery mask"), (2, 2): (masks[1], "iQuery mask")}
    for (r, c), axis in np.ndenumerate(ax):
        if (r, c) not in show:
            axis.axis("off")
            continue
        img, title = show[(r, c)]
        axis.imshow(img, origin="lower", aspect="auto", cmap="magma")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("STFT frame")
        axis.set_ylabel("log-frequency row")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"masks_pair{pair_index}.png"
    fig.suptitle(f"test pair {item['name']} (first 6 s, warped grid)")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    ap.add_argument("--pair", type=int, default=0)
    args = ap.parse_args(argv)
    print(mask_panel(args.ckpt, args.data, args.out, args.pair))
    return 0


if __name__ == "__main__":
    sys.exit(main())
