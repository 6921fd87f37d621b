"""Re-estimate a trained separator's BatchNorm statistics on mixtures of K training clips.

Training draws K=3 clips per mixture (docs/RESULTS.md section 14), so the audio U-Net's
BatchNorm running statistics describe mixtures of three sources, while the test pairs hold two
(a quieter, sparser input). This command keeps every weight and replaces only those statistics
with their average over `--batches` batches of K-clip training mixtures (AdaBN, Li et al. 2016:
the normalisation of the condition the model is used in). Only training clips are read; the
choice of K belongs to the val pairs, as any model choice does (section 49).

    python -m training.recalibrate --ckpt runs/iquery/best --out runs/iquery/best_bn2 \
        --data data/synth --n-mix 2

The U-Net sees the mixture alone, so the BatchNorm layers run in training mode and everything
else in eval mode (no dropout): the result depends on the clips drawn (--seed) and nothing else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from models.checkpoint import checkpoint_stem, load_checkpoint, save_checkpoint
from training.instruments import load_vocabulary
from training.mixdata import MixSampler, load_solo
from training.train import forward, to_tensors


def recalibrate_batchnorm(model: nn.Module, sampler: MixSampler, batches: int, batch: int = 8,
                          progress: bool = False) -> int:
    """Replace every BatchNorm layer's running mean and variance by their plain average over
    `batches` batches drawn from `sampler` (momentum None: a cumulative average, each batch
    weighted alike). Weights are untouched; the model is left in eval mode. Returns the number
    of BatchNorm layers."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer to recalibrate")
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for _ in tqdm(range(batches), desc="BatchNorm statistics", disable=not progress):
                forward(model, to_tensors(sampler.sample(batch), model.n_rows, device))
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return len(bns)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="separator checkpoint stem (e.g. runs/x/best)")
    ap.add_argument("--out", required=True, help="stem of the checkpoint to write")
    ap.add_argument("--data", required=True, type=Path, help="SynthMUSIC (or MUSIC) root")
    ap.add_argument("--features", type=Path, default=None,
                    help="feature cache (default <data>/features)")
    ap.add_argument("--n-mix", type=int, default=2,
                    help="clips per mixture (default 2: the test pairs' K)")
    ap.add_argument("--batches", type=int, default=200,
                    help="batches of 8 mixtures averaged (default 200: ~13 s on 2 cores, "
                         "loading the clips included)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the clips drawn")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args(argv)
    if args.n_mix < 1 or args.batches < 1:
        ap.error("--n-mix and --batches must be >= 1")
    stem = checkpoint_stem(args.ckpt)
    if not stem.with_suffix(".json").is_file():
        ap.error(f"--ckpt {args.ckpt}: no checkpoint there ({stem}.json missing)")
    if checkpoint_stem(args.out) == stem:
        ap.error("--out must differ from --ckpt: the original checkpoint is kept")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_checkpoint(stem)
    if not hasattr(model, "n_rows"):
        ap.error(f"--ckpt {args.ckpt}: a separator checkpoint expected, "
                 f"got a {type(model).__name__}")
    names = meta.get("class_names") or [inst.name for inst in load_vocabulary()]
    # A prompt pre-training never saw its held-out classes: leave them out. A prompt fine-tune's
    # checkpoint names none, so its statistics include the new classes (RESULTS section 50).
    excluded = set(meta.get("excluded_classes") or [])
    try:
        clips = [c for c in load_solo(args.data, "train", names, args.features)
                 if c.class_name not in excluded]
    except FileNotFoundError as e:  # no dataset there, or no feature cache
        ap.error(f"--data {args.data}: {e}")
    try:
        sampler = MixSampler(clips, model.n_frames, args.n_mix, seed=args.seed)
    except ValueError as e:
        ap.error(f"--n-mix {args.n_mix}: {e}")
    n = recalibrate_batchnorm(model, sampler, args.batches, progress=True)
    meta = meta | {"bn_recalibrated": {"from": str(stem), "n_mix": args.n_mix,
                                       "batches": args.batches, "seed": args.seed,
                                       "command": "python -m training.recalibrate "
                                                  + " ".join(sys.argv[1:] if argv is None
                                                             else argv)}}
    save_checkpoint(args.out, model, meta)
    print(f"{n} BatchNorm layers re-estimated on {args.batches} x 8 mixtures of "
          f"{args.n_mix} training clips -> {checkpoint_stem(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
