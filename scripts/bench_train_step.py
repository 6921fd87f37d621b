"""The real Mix-and-Separate step of training/train.py (sampling, STFTs, forward, backward,
optimizers) under its process-level settings, as ratios in one run: glibc's malloc keeping freed
memory or not (train.retain_freed_memory), and fused or per-parameter Adam / AdamW. With
--batches it times train.py's configuration at several batch sizes instead: the steps and the
mixtures a fixed budget buys at each; with --mask-dims, at several widths of the audio
embedding (train.py --mask-dim); with --token-strides, at several strides of the transformer's
audio tokens (train.py --token-stride); with --audio-layers, at several depths of the
transformer's audio-aware decoder (train.py --audio-layers); with --mix, with the U-Net's
per-query sums of its audio embedding formed through the outer layer's weights (AudioUNet.mix,
since 2026-12-06) and over the embedding itself (AudioUNet.mix_by_embedding, before).

Each configuration runs in its own fresh process (a malloc setting holds for a whole process),
and the rounds interleave them, so load from other programs hits every configuration alike.
The clips are synthetic noise (no dataset needed): the step's cost does not depend on content.

    .venv/bin/python scripts/bench_train_step.py [--model iquery] [--n-rows 256] [--n-mix 3]
        [--threads 2] [--rounds 5] [--steps 20] [--warmup 5] [--batches 4,8,16]
        [--mask-dims 32,16] [--token-strides 16,8] [--audio-layers 3,1] [--mix]
        [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {  # name -> (retain freed memory, fused optimizers)
    "malloc default, per-parameter Adam": (False, False),
    "malloc default, fused Adam": (False, True),
    "freed memory kept, per-parameter Adam": (True, False),
    "freed memory kept, fused Adam (train.py)": (True, True),
}


def worker(args: argparse.Namespace) -> None:
    """Time `args.steps` training steps after `args.warmup`; print the median ms as JSON."""
    retain, fused = CONFIGS[args.worker]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from training import train

    if retain:
        train.retain_freed_memory()
    import numpy as np
    import torch

    from models.spectral import SAMPLE_RATE
    from models.unet import AudioUNet
    from training.mixdata import MixSampler, SoloClip

    if args.mix_by_embedding:  # the former computation, for this worker process only
        AudioUNet.mix = AudioUNet.mix_by_embedding

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = {"n_rows": args.n_rows} | json.loads(args.sizes)
    model = train.make_model(args.model, "cpu", **sizes).train()
    opts = train.make_optimizers(model, 1e-4, 1e-3)
    if not fused:  # the same optimizers, stepping parameter by parameter
        opts = [type(o)(o.param_groups[0]["params"], lr=o.defaults["lr"],
                        weight_decay=o.defaults["weight_decay"]) for o in opts]
    rng = np.random.default_rng(0)
    clips = [SoloClip(f"c{i}", f"class{i % 6}", i % 6,
                      (0.1 * rng.standard_normal(6 * SAMPLE_RATE)).astype(np.float32),
                      rng.standard_normal(512).astype(np.float32),
                      rng.standard_normal((48, 512)).astype(np.float16)) for i in range(24)]
    sampler = MixSampler(clips, model.n_frames, args.n_mix, seed=0)
    device = torch.device("cpu")
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        train.train_step(model, opts, sampler, args.batch, model.n_rows, device,
                         precision=args.precision)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"ms": 1e3 * statistics.median(times)}))


def positive_ints(ap: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    """`--flag 4,8,16` -> [4, 8, 16], or a one-line usage error."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        ap.error(f"{flag} {text!r}: expected comma-separated integers, e.g. 4,8,16")
    if min(values) < 1:
        ap.error(f"{flag} {text!r}: values must be >= 1")
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="iquery", choices=["iquery", "iquery_nomotion", "sop"])
    ap.add_argument("--n-rows", type=int, default=256, help="grid rows (default 256, shipped)")
    ap.add_argument("--n-mix", type=int, default=3, help="clips per mixture (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=5,
                    help="untimed steps first (default 5): glibc adapts its mmap threshold to "
                         "the blocks freed, so a long run's default may differ from a fresh one")
    ap.add_argument("--batches", default="",
                    help="comma-separated batch sizes (e.g. 4,8,16): time train.py's "
                         "configuration at each instead of the configurations above")
    ap.add_argument("--mask-dims", default="",
                    help="comma-separated widths of the audio embedding (e.g. 32,16): time "
                         "train.py's configuration at each instead (batch 8)")
    ap.add_argument("--token-strides", default="",
                    help="comma-separated strides of the transformer's audio tokens (e.g. "
                         "16,8): time train.py's configuration at each instead (batch 8)")
    ap.add_argument("--audio-layers", default="",
                    help="comma-separated depths of the transformer's audio-aware decoder "
                         "(e.g. 3,1): time train.py's configuration at each instead (batch 8)")
    ap.add_argument("--mix", action="store_true",
                    help="time train.py's configuration with the audio embedding's per-query "
                         "sums formed through the outer layer's weights (models/unet.py "
                         "AudioUNet.mix, shipped) and over the embedding (mix_by_embedding)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="the forward pass in float32 (default) or under bfloat16 autocast, "
                         "as train.py --precision")
    ap.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="{}", help=argparse.SUPPRESS)  # JSON constructor kwargs
    ap.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--mix-by-embedding", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    common = ["--model", args.model, "--n-rows", str(args.n_rows), "--n-mix", str(args.n_mix),
              "--threads", str(args.threads), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--precision", args.precision]
    grids = (args.batches, args.mask_dims, args.token_strides, args.audio_layers, args.mix)
    if sum(map(bool, grids)) > 1:
        ap.error("give one of --batches, --mask-dims, --token-strides, --audio-layers and --mix")
    if (args.token_strides or args.audio_layers) and args.model == "sop":
        ap.error("--token-strides / --audio-layers: Sound-of-Pixels has no audio-aware "
                 "transformer; choose an iquery model")
    # (label, config, batch, constructor kwargs beyond the preset's, mix by embedding) per worker
    shipped = list(CONFIGS)[-1]  # train.py's configuration
    if args.mask_dims:
        runs = [(f"mask_dim {d}", shipped, 8, {"mask_dim": d}, False)
                for d in positive_ints(ap, "--mask-dims", args.mask_dims)]
    elif args.token_strides:
        runs = [(f"token_stride {t}", shipped, 8, {"token_stride": t}, False)
                for t in positive_ints(ap, "--token-strides", args.token_strides)]
    elif args.audio_layers:
        runs = [(f"audio layers {n}", shipped, 8, {"n_audio_layers": n}, False)
                for n in positive_ints(ap, "--audio-layers", args.audio_layers)]
    elif args.batches:
        runs = [(f"batch {b}", shipped, b, {}, False)
                for b in positive_ints(ap, "--batches", args.batches)]
    elif args.mix:
        runs = [("mix over the embedding (before)", shipped, 8, {}, True),
                ("mix through the weights (AudioUNet.mix)", shipped, 8, {}, False)]
    else:
        runs = [(name, name, 8, {}, False) for name in CONFIGS]
    print(f"{args.model}, {args.n_rows} rows, K={args.n_mix}, "
          f"batch {args.batches or 8}, {args.precision}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} steps after {args.warmup}; "
          "median [min - max] of per-round medians")
    ms: dict[str, list[float]] = {label: [] for label, *_ in runs}
    for r in range(args.rounds):
        for label, config, batch, sizes, by_embedding in runs:
            extra = ["--mix-by-embedding"] if by_embedding else []
            out = subprocess.run([sys.executable, __file__, "--worker", config, "--batch",
                                  str(batch), "--sizes", json.dumps(sizes), *extra, *common],
                                 check=True, capture_output=True, text=True).stdout
            ms[label].append(json.loads(out.strip().splitlines()[-1])["ms"])
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    base = statistics.median(ms[runs[0][0]])
    for (label, _, batch, *_), values in zip(runs, ms.values(), strict=True):
        med = statistics.median(values)
        line = (f"{label:45s} {med:6.1f} ms [{min(values):6.1f} - {max(values):6.1f}]  "
                f"x{base / med:.2f}")
        if args.batches:  # x = steps one budget buys against the first batch size; mixtures too
            line += (f"  {med / batch:5.2f} ms/mixture, "
                     f"mixtures x{base / med * batch / runs[0][2]:.2f}")
        print(line)


if __name__ == "__main__":
    main()
