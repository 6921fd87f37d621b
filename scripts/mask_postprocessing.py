"""Does post-processing the separator's masks close any of the distance to the ideal ratio mask?
Scores a checkpoint's GT-named estimates on val (or test) pairs with its masks as predicted and
with common test-time variants, all from the same forward passes:

    python scripts/mask_postprocessing.py --ckpt runs/iquery_k3_rows256_bf16/best --pairs-from val

Variants, on the unwarped masks m_k of the K sources of a pair (mixture phase throughout):
  as predicted   m_k (what training.evaluate scores)
  capped         m_k / max(1, sum_j m_j): the estimates never sum above the mixture
  normalised     m_k / sum_j m_j: the estimates always sum to the mixture
  power p        m_k^p / sum_j m_j^p: p = 2 a Wiener-like sharpening (more suppression), p = 0.5
                 and 0.75 a softening (less suppression: the separator's SIR is above the
                 IRM's and its SAR far below, so it removes too much), and the same scaled
                 by min(1, sum_j m_j) ("power p, capped")
  raised p       m_k^p alone (p < 1): every mask moved towards 1, the sum left free
and, with --oracle-gates, two bounds that read the references (not deployable: what a perfect
per-frame "is it playing?" signal, such as ideal motion cues, could add at most):
  oracle gate    m_k set to 0 in the STFT frames where source k is silent (its frame energy
                 more than 30 dB under the mixture's)
  oracle gate, solo frames 1   the same, and m_k = 1 where k is the only source sounding
and each with the sliding windows every half window (training.separate's default) or every
quarter window (twice the forward passes, each frame averaged over four windows).
Model selection belongs to val pairs (the default); --pairs-from test only to report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.checkpoint import load_checkpoint  # noqa: E402
from models.spectral import istft, stft, unwarp  # noqa: E402
from training.evaluate import load_items, query_from  # noqa: E402
from training.instruments import load_vocabulary  # noqa: E402
from training.metrics import bss_eval  # noqa: E402
from training.separate import separate_masks  # noqa: E402


def variants(m: torch.Tensor, powers: tuple[float, ...] = (0.5, 0.75, 2.0)
             ) -> dict[str, torch.Tensor]:
    """m (K, N_BINS, T) masks in [0, 1] -> the post-processed masks by name."""
    total = m.sum(0, keepdim=True)
    out = {"as predicted": m, "capped": m / total.clamp_min(1.0),
           "normalised": m / total.clamp_min(1e-6)}
    for p in powers:
        mp = m ** p
        shaped = mp / mp.sum(0, keepdim=True).clamp_min(1e-6)
        out[f"power {p:g}"] = shaped
        out[f"power {p:g}, capped"] = shaped * total.clamp(max=1.0)
        if p < 1:
            out[f"raised {p:g}"] = mp
    return out


ORACLE_SILENCE_DB = -30.0


def oracle_gates(m: torch.Tensor, refs_spec: torch.Tensor, mix_spec: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
    """m (K, N_BINS, T) masks, refs_spec (K, N_BINS, T) and mix_spec (N_BINS, T) complex ->
    the oracle-gated masks by name (see the module docstring)."""
    energy = (refs_spec.abs() ** 2).sum(1)  # (K, T)
    mix_energy = (mix_spec.abs() ** 2).sum(0).clamp_min(1e-12)  # (T,)
    active = energy > mix_energy * 10 ** (ORACLE_SILENCE_DB / 10)  # (K, T)
    gated = m * active[:, None, :]
    solo = (active.sum(0) == 1)[None, None, :]
    return {"oracle gate": gated,
            "oracle gate, solo frames 1": torch.where(solo, active[:, None, :].to(m), gated)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, required=True, help="separator checkpoint stem")
    ap.add_argument("--data", type=Path, default=Path("data/synth"))
    ap.add_argument("--pairs-from", choices=["val", "test"], default="val")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--max-pairs", type=int, default=None, help="evenly spaced subset")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--hops", default="half,quarter",
                    help="comma-separated window hops to score: half, quarter")
    ap.add_argument("--oracle-gates", action="store_true",
                    help="also score the oracle per-frame activity gates (they read the "
                         "references: a bound, never a variant to ship)")
    ap.add_argument("--json", type=Path, default=None, help="write the table here too")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, _ = load_checkpoint(args.ckpt)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --ckpt {args.ckpt}: {e}") from None
    model.eval()
    hops = [h for h in args.hops.split(",") if h]
    if not hops or set(hops) - {"half", "quarter"}:
        raise SystemExit(f"error: --hops {args.hops!r}: choose from half, quarter")
    names = [i.name for i in load_vocabulary()]
    pairs, _ = load_items(args.data, args.seconds, args.max_pairs, 0,
                           pairs_from=args.pairs_from)
    scores: dict[str, dict[str, list[float]]] = {}  # variant -> sdr/sir/sar -> per source
    t0 = time.time()
    for it in tqdm(pairs, desc="pairs"):
        queries = [query_from(s, names, c) for s, c in zip(it["gt"], it["classes"], strict=True)]
        x = torch.from_numpy(it["mix"].astype(np.float32))
        spec = stft(x)
        refs_spec = (stft(torch.from_numpy(np.asarray(it["refs"], np.float32)))
                     if args.oracle_gates else None)
        for hop_name in hops:
            hop = model.n_frames // {"half": 2, "quarter": 4}[hop_name]
            m = unwarp(separate_masks(model, spec, queries, hop=hop)[None])[0].clamp(0, 1)
            named = variants(m)
            if args.oracle_gates:
                named |= oracle_gates(m, refs_spec, spec)
            for name, mm in named.items():
                est = istft(mm * spec[None], x.shape[-1]).numpy()
                row = scores.setdefault(f"{name}, hop {hop_name} window", {})
                for metric, vals in bss_eval(it["refs"], est).items():
                    row.setdefault(metric, []).extend(vals.tolist())
    table = {k: {m: float(np.mean(v)) for m, v in row.items()} for k, row in scores.items()}
    print(f"\n{len(pairs)} {args.pairs_from} pairs, GT-named, {args.ckpt} "
          f"({time.time() - t0:.0f} s)\n\n| variant | SDR | SIR | SAR |\n|---|---:|---:|---:|")
    for k, v in table.items():
        print(f"| {k} | {v['sdr']:.2f} | {v['sir']:.2f} | {v['sar']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "n_pairs": len(pairs),
                                         "scores": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
