"""Figures for docs/RESULTS.md: a spectrogram / mask panel of one test pair (mixture, each
source, the ideal ratio mask, a trained separator's mask per query and the separated
spectrogram it gives), and a t-SNE of learned query embeddings (class rows, spare rows,
audio-prompt rows), one panel per checkpoint, and the validation curves of training runs
(val SDR against steps and against minutes; a run in progress is read from its last/ state).

    python -m training.figures --data data/synth --ckpt runs/iquery/best --pair 5 --pair 40
    python -m training.figures --tsne runs/iquery/best --tsne runs/prompts/ft_prompt_violin/best
    python -m training.figures --curves "iQuery=runs/iquery" --curves "SoP=runs/sop"
"""

from __future__ import annotations

import argparse
import json
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
    fig, ax = plt.subplots(4, 3, figsize=(12, 10.5), constrained_layout=True)
    show = {(0, 0): (np.log1p(mix), "mixture |S| (log)"),
            (0, 1): (np.log1p(src[0]), f"{item['classes'][0]} |S| (log)"),
            (0, 2): (np.log1p(src[1]), f"{item['classes'][1]} |S| (log)"),
            (1, 1): (ideal[0], "ideal ratio mask"), (1, 2): (ideal[1], "ideal ratio mask"),
            (2, 1): (masks[0], "iQuery mask"), (2, 2): (masks[1], "iQuery mask"),
            # What the listener gets: the mask applied to the mixture (mixture phase).
            (3, 1): (np.log1p(masks[0] * mix), "separated |S| (log)"),
            (3, 2): (np.log1p(masks[1] * mix), "separated |S| (log)")}
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


def query_tsne(ckpts: list[Path], out: Path, seed: int = 0) -> Path:
    """Write <out>/query_tsne.png: per checkpoint, a 2-D t-SNE (sklearn, cosine metric) of
    every row of its query table; returns its path. Each model has its own embedding space,
    so every checkpoint gets its own panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    names = [i.name for i in load_vocabulary()]
    fig, axes = plt.subplots(1, len(ckpts), figsize=(6 * len(ckpts), 5.5), squeeze=False,
                             constrained_layout=True)
    for axis, ckpt in zip(axes[0], ckpts, strict=True):
        model, meta = load_checkpoint(ckpt)
        table = model.query_table().detach().float().numpy()  # (n_ids, D)
        prompts = dict(zip(meta.get("prompt_ids", []), meta.get("held_out", []), strict=True))
        labels, kinds = [], []
        for i in range(len(table)):
            if i in prompts:
                labels.append(f"prompt: {prompts[i]}")
                kinds.append("prompt")
            elif i < model.n_classes:
                held = names[i] in meta.get("held_out", [])  # this row never trained
                labels.append(names[i] + (" (unused)" if held else ""))
                kinds.append("unused" if held else "class")
            else:
                labels.append(f"spare {i}" if i < model.n_queries else f"prompt {i}")
                kinds.append("spare" if i < model.n_queries else "prompt")
        xy = TSNE(n_components=2, perplexity=min(5.0, len(table) - 1.0), metric="cosine",
                  init="pca", random_state=seed).fit_transform(table)
        style = {"class": ("tab:blue", "o"), "spare": ("tab:gray", "x"),
                 "unused": ("tab:orange", "s"), "prompt": ("tab:red", "*")}
        for kind, (color, marker) in style.items():
            sel = [j for j, k in enumerate(kinds) if k == kind]
            if sel:
                axis.scatter(xy[sel, 0], xy[sel, 1], c=color, marker=marker,
                             s=120 if kind == "prompt" else 40, label=kind)
        for (x, y), text in zip(xy, labels, strict=True):
            axis.annotate(text, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        axis.set_title(str(ckpt), fontsize=9)
        axis.legend(fontsize=7)
        axis.set_xticks([])
        axis.set_yticks([])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "query_tsne.png"
    fig.suptitle("t-SNE of the learned query embeddings (cosine)")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run_history(run: Path) -> list[dict]:
    """The validation history of a training run folder (training.train --out): summary.json
    once it has finished, last/train.json while it runs."""
    for f in (run / "summary.json", run / "last" / "train.json"):
        if f.is_file():
            return json.loads(f.read_text())["history"]
    raise FileNotFoundError(f"{run}: neither summary.json nor last/train.json (not a "
                            f"training.train --out folder, or no validation yet)")


def val_curves(runs: list[tuple[str, Path]], out: Path, name: str = "val_curves.png") -> Path:
    """Write <out>/<name>: validation SDR against training steps (left) and against wall-clock
    minutes (right), one line per (label, run folder); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for label, run in runs:
        hist = run_history(run)
        steps = [h["step"] for h in hist]
        sdr = [h["sdr"] for h in hist]
        line, = by_step.plot(steps, sdr, marker=".", label=label)
        by_time.plot([h["elapsed"] / 60 for h in hist], sdr, marker=".", color=line.get_color(),
                     label=label)
    by_step.set_xlabel("training step")
    by_time.set_xlabel("wall-clock minutes")
    for axis in (by_step, by_time):
        axis.set_ylabel("val SDR (dB)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.suptitle("validation SDR during training (fixed val mixtures, one window each)")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--tsne", type=Path, action="append", default=[],
                    help="checkpoint stem for the query t-SNE panel (repeatable)")
    ap.add_argument("--curves", action="append", default=[], metavar="LABEL=RUN",
                    help="training run folder for the validation curves (repeatable)")
    ap.add_argument("--curves-name", default="val_curves.png",
                    help="file name of the validation curves figure under --out")
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    ap.add_argument("--pair", type=int, action="append", default=None,
                    help="test pair index for the mask panel (repeatable; default 0)")
    args = ap.parse_args(argv)
    if args.curves:
        runs = []
        for spec in args.curves:
            label, sep, run = spec.rpartition("=")  # as --ckpt: a label may hold "K=3"
            if not sep or not label or not run:
                ap.error(f"--curves {spec!r}: expected LABEL=RUN_FOLDER")
            runs.append((label, Path(run)))
        try:
            print(val_curves(runs, args.out, args.curves_name))
        except FileNotFoundError as e:
            ap.error(str(e))
    if args.tsne:
        print(query_tsne(args.tsne, args.out))
    if args.ckpt is not None:
        if args.data is None:
            ap.error("the mask panel (--ckpt) needs --data")
        for pair in args.pair or [0]:
            print(mask_panel(args.ckpt, args.data, args.out, pair))
    elif not args.tsne and not args.curves:
        ap.error("give --ckpt (mask panel), --tsne (query t-SNE) and/or --curves (val curves)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
