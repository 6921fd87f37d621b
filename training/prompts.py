"""Audio prompts (paper Sec. 3.4, Table 4): extend a pre-trained iQuery to held-out classes by
adding prompt queries and fine-tuning only them, against fine-tuning the whole network; plus the
random query assignment ablation. Pre-train without the held-out classes first (the shipped
separator's recipe, docs/RESULTS.md section 15), then fine-tune and score:

    python -m training.train --data data/synth --preset cpu --model iquery --n-mix 3 \
        --n-rows 256 --minutes 55 --threads 1 --exclude-classes violin --out runs/pre_violin
    python -m training.prompts finetune --data data/synth --init runs/pre_violin/best \
        --classes violin --mode prompt --minutes 8 --out runs/ft_prompt_violin
    python -m training.prompts evaluate --data data/synth --classes violin \
        --ckpt prompt=runs/ft_prompt_violin/best --ckpt full=models/checkpoints/cpu/separator \
        --out runs/eval_violin
    (add --pairs-from val to choose between fine-tuned models on val pairs, never on test)
    python -m training.prompts random-queries --data data/synth \
        --ckpt models/checkpoints/cpu/separator --out runs/random_queries

Fine-tuning draws Mix-and-Separate examples that always hold one held-out class (the others
random); a held-out class is named by its new prompt id, every other class keeps its id. Every
mode adds the prompt rows (so all name the new class the same way); `prompt` trains only
them (every other parameter frozen, batch norms in eval mode), `full` trains everything;
`decoder` and `unet` train the rows plus one half of the network (a diagnostic, section 28).
`--rows R` (a variant beside the paper's one row per class, section 29) gives each held-out
class R prompt rows whose masks are joined (RowUnion).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.checkpoint import load_checkpoint, save_checkpoint
from training.evaluate import load_items, parse_ckpt, query_from
from training.instruments import load_vocabulary
from training.metrics import bss_eval
from training.mixdata import MixSampler, SoloClip, load_solo
from training.separate import separate_wave
from training.train import (
    NonFiniteStep,
    PrecisionGuard,
    make_optimizers,
    pick_precision,
    retain_freed_memory,
    set_lr,
    train_step,
    validate,
)

# What trains besides the new prompt rows. `decoder` and `unet` split the network in two (the
# query side, and the audio U-Net whose per-pixel embeddings the masks are read from), to see
# which half lacks what the held-out classes need when prompt-only falls short.
MODES = ("prompt", "decoder", "unet", "full")


class HeldOutSampler(MixSampler):
    """MixSampler whose every example holds one class of `must` (drawn uniformly), the other
    K-1 classes drawn from the rest without replacement."""

    def __init__(self, clips: list[SoloClip], n_frames: int, must: list[int], n_mix: int = 2,
                 seed: int = 0, gain_db: float = 3.0) -> None:
        super().__init__(clips, n_frames, n_mix, seed, gain_db)
        missing = [m for m in must if m not in self.by_class]
        if missing:
            raise ValueError(f"held-out ids {missing} have no clips; ids present: "
                             f"{sorted(self.by_class)}")
        self.must = list(must)

    def sample(self, batch: int) -> dict[str, np.ndarray]:
        """As MixSampler.sample; column order is shuffled so the held-out class has no slot."""
        rows: list[list[tuple]] = []
        ids = []
        for _ in range(batch):
            first = self.must[int(self.rng.integers(len(self.must)))]
            others = [k for k in sorted(self.by_class) if k != first]
            chosen = [first, *self.rng.choice(others, size=self.n_mix - 1, replace=False)]
            chosen = [int(c) for c in self.rng.permutation(chosen)]
            rows.append([self.draw(c) for c in chosen])
            ids.append(chosen)
        return self.stack(rows, ids)


class RowUnion(nn.Module):
    """R prompt rows per held-out class instead of one (a variant, not the paper's method).

    A slot named by a held-out class's primary id (the first of its R consecutive rows) is
    decoded as R queries, one per row, and its mask is their union 1 - prod_r (1 - m_r): R
    directions in the frozen U-Net's per-pixel embedding instead of one, for a class that one
    direction does not cover. Every other slot keeps one query (its extra copies are padded,
    so they take no part in the queries' self-attention). Same call as IQuery.forward."""

    def __init__(self, model: nn.Module, primary_ids: list[int], rows: int) -> None:
        super().__init__()
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        self.model, self.rows = model, rows
        self.n_rows, self.n_frames = model.n_rows, model.n_frames
        device = next(model.parameters()).device
        self.register_buffer("primary", torch.tensor(primary_ids, dtype=torch.long,
                                                     device=device), persistent=False)

    def forward(self, x: torch.Tensor, obj_feats: torch.Tensor, class_ids: torch.Tensor,
                motion: torch.Tensor, motion_pad: torch.Tensor, query_pad: torch.Tensor
                ) -> torch.Tensor:
        r, q = self.rows, class_ids.shape[1]
        multi = torch.isin(class_ids, self.primary) & ~query_pad  # (B, Q)
        offset = torch.arange(r, device=class_ids.device)
        ids = class_ids[:, :, None] + offset * multi[:, :, None]  # (B, Q, R)
        pad = query_pad[:, :, None] | ((offset > 0) & ~multi[:, :, None])
        masks = self.model(x, obj_feats.repeat_interleave(r, 1), ids.flatten(1),
                           motion.repeat_interleave(r, 1), motion_pad.repeat_interleave(r, 1),
                           pad.flatten(1))  # (B, Q * R, F, T); padded copies are zero
        return 1 - torch.prod(1 - masks.unflatten(1, (q, r)), dim=2)


def prepare(model: nn.Module, n_new: int, mode: str, deep: bool = False) -> list[int]:
    """Add n_new prompt queries (deep: with per-layer offsets, IQuery.add_prompts); `prompt`
    leaves only them trainable, `decoder` also everything outside the audio U-Net, `unet` also
    the U-Net, `full` everything. Returns the new ids."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
    new_ids = model.add_prompts(n_new, deep=deep)
    if mode != "prompt":
        for name, p in model.named_parameters():
            in_unet = name.startswith("unet.")
            if mode == "full" or (mode == "unet") == in_unet:
                p.requires_grad_(True)
        # The batch norms (all in the U-Net) follow their layers: they train unless frozen.
        model.prompt_tuning = mode == "decoder"
        model.train(model.training)
    return new_ids


def trainable_fraction(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    n_all = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), n_all


def make_finetune_optimizers(model: nn.Module, mode: str, lr_prompt: float,
                             lr_transformer: float, lr_audio: float,
                             lr_offsets: float | None = None) -> list[torch.optim.Optimizer]:
    """`prompt`: Adam (no weight decay) on the prompt rows only, deep prompts' per-layer
    offsets at lr_offsets (None: lr_prompt); the other modes: train.py's optimizers over what
    trains (the prompt rows then sit with the transformer)."""
    if mode == "prompt":
        offsets = {id(p) for p in getattr(model, "prompt_offsets", [])}
        rows = [p for p in model.parameters() if p.requires_grad and id(p) not in offsets]
        deep = [p for p in model.parameters() if p.requires_grad and id(p) in offsets]
        groups = [{"params": rows, "lr": lr_prompt}]
        if deep:
            groups.append({"params": deep, "lr": lr_prompt if lr_offsets is None
                           else lr_offsets})
        return [torch.optim.Adam(groups, fused=True)]
    return make_optimizers(model, lr_transformer, lr_audio)


def remap(clips: list[SoloClip], id_map: dict[int, int]) -> list[SoloClip]:
    """Copies of clips whose class id is renamed through id_map (held-out class -> prompt)."""
    return [dataclasses.replace(c, class_id=id_map.get(c.class_id, c.class_id)) for c in clips]


def finetune(args: argparse.Namespace) -> int:
    """The fine-tuning loop behind `finetune` (wall-time and/or step budget, best by val)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = pick_precision(args.precision, device)
    names = [i.name for i in load_vocabulary()]
    held = [c for c in args.classes.split(",") if c]
    for c in held:
        if c not in names:
            raise ValueError(f"unknown class {c!r}; choose from {names}")
    model, meta0 = load_checkpoint(args.init)
    model = model.to(device)
    # Each held-out class gets args.rows consecutive rows, named by the first of them.
    new_ids = prepare(model, len(held) * args.rows, args.mode, args.deep)[::args.rows]
    id_map = {names.index(c): i for c, i in zip(held, new_ids, strict=True)}
    net = model  # what is saved; `model` below is what trains (the row union, if any)
    if args.rows > 1:
        model = RowUnion(net, new_ids, args.rows)
    n_train, n_all = trainable_fraction(net)
    print(f"{args.mode}: prompt ids {dict(zip(held, new_ids, strict=True))} "
          f"({args.rows} row(s) each), trainable "
          f"{n_train} / {n_all} = {100 * n_train / n_all:.4f} %", flush=True)
    sampler = HeldOutSampler(remap(load_solo(args.data, "train", names), id_map),
                             model.n_frames, new_ids, n_mix=args.n_mix, seed=args.seed)
    val = HeldOutSampler(remap(load_solo(args.data, "val", names), id_map), model.n_frames,
                         new_ids, n_mix=args.n_mix, seed=12345, gain_db=0.0)
    val_batches = [val.sample(8) for _ in range(args.val_mixtures // 8)]
    opts = make_finetune_optimizers(net, args.mode, args.lr_prompt, args.lr_transformer,
                                    args.lr_audio, args.lr_offsets)
    base = [[g["lr"] for g in o.param_groups] for o in opts]
    meta = {"mode": args.mode, "held_out": held, "prompt_ids": new_ids,
            "rows_per_class": args.rows, "deep": args.deep, "init": str(args.init),
            "trainable": n_train, "total": n_all, "init_meta_step": meta0.get("step"),
            "n_mix": args.n_mix, "precision": precision,
            "command": "python -m training.prompts " + " ".join(sys.argv[1:])}
    budget = args.minutes * 60 if args.minutes else float("inf")
    max_steps = args.steps or 10 ** 9
    best, history, step = -1e9, [], 0
    args.out.mkdir(parents=True, exist_ok=True)
    v = validate(model, val_batches, model.n_rows, device)
    history.append({"step": 0, "elapsed": 0.0} | v)
    print(f"step 0 val sdr {v['sdr']:.2f}", flush=True)
    model.train()
    guard = PrecisionGuard(precision)
    t0 = time.time()
    while step < max_steps and time.time() - t0 < budget:
        set_lr(opts, base, max(step / max_steps, (time.time() - t0) / budget))
        try:
            loss = train_step(model, opts, sampler, args.batch, model.n_rows, device,
                              precision=guard.precision)
            guard.passed()
        except NonFiniteStep:
            print(guard.failed(step), flush=True)
            meta |= guard.state()
            continue
        step += 1
        last = step >= max_steps or time.time() - t0 >= budget
        if step % args.val_every == 0 or last:
            v = validate(model, val_batches, model.n_rows, device)
            history.append({"step": step, "elapsed": round(time.time() - t0, 1),
                            "loss": loss.item()} | v)
            print(f"step {step} loss {loss.item():.4f} val sdr {v['sdr']:.2f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            if v["sdr"] > best:
                best = v["sdr"]
                save_checkpoint(args.out / "best", net, meta | {"step": step, "val": v})
    (args.out / "summary.json").write_text(json.dumps(
        meta | {"steps": step, "elapsed": time.time() - t0, "best_sdr": best,
                "history": history}, indent=1) + "\n")
    print(f"done: {step} steps, best val SDR {best:.2f} dB", flush=True)
    return 0


# ------------------------------------------------------------------------------ evaluation
def _prompt_map(meta: dict[str, Any], names: list[str]) -> dict[str, int]:
    """class name -> query id for the held-out classes of a fine-tuned checkpoint."""
    return dict(zip(meta.get("held_out", []), meta.get("prompt_ids", []), strict=True))


def evaluate_heldout(model: nn.Module, items: list[dict], names: list[str],
                     id_of: dict[str, int], held: list[str]) -> dict[str, Any]:
    """SDR/SIR/SAR over the given test items (GT-named); classes in id_of use those query
    ids. Means over every source, over the held-out classes' sources, and over the others'."""
    per_src: list[tuple[str, float, float, float]] = []
    for it in items:
        queries = []
        for stem, cls in zip(it["gt"], it["classes"], strict=True):
            q = query_from(stem, names, cls)
            queries.append(dataclasses.replace(q, class_id=id_of.get(cls, names.index(cls))))
        est = separate_wave(model, it["mix"], queries)
        m = bss_eval(it["refs"], est)
        per_src += [(c, float(a), float(b), float(d)) for c, a, b, d in
                    zip(it["classes"], m["sdr"], m["sir"], m["sar"], strict=True)]

    def mean(rows: list[tuple]) -> dict[str, float]:
        return {"sdr": float(np.mean([r[1] for r in rows])),
                "sir": float(np.mean([r[2] for r in rows])),
                "sar": float(np.mean([r[3] for r in rows])),
                "sdr_median": float(np.median([r[1] for r in rows])), "n": len(rows)}

    held_rows = [r for r in per_src if r[0] in held]
    # The classes the network knew before: what fine-tuning the whole network can cost them.
    known_rows = [r for r in per_src if r[0] not in held]
    return {"all": mean(per_src), "held_out": mean(held_rows) if held_rows else None,
            "others": mean(known_rows) if known_rows else None}


def evaluate_cmd(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [i.name for i in load_vocabulary()]
    held = [c for c in args.classes.split(",") if c]
    pairs, _ = load_items(args.data, args.seconds, None, 0, pairs_from=args.pairs_from)
    items = [p for p in pairs if set(p["classes"]) & set(held)]
    if not items:
        raise ValueError(f"no {args.pairs_from} pair holds any of {held}")
    print(f"{len(items)} {args.pairs_from} pairs hold {held}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"held_out": held, "pairs_from": args.pairs_from,
                               "n_pairs": len(items), "rows": {},
                               "command": "python -m training.prompts " + " ".join(sys.argv[1:])}
    for spec in args.ckpt:
        label, stems = parse_ckpt(spec)
        if len(stems) != 1:  # the prompt map is per checkpoint
            raise SystemExit(f"error: --ckpt {spec!r}: one checkpoint per row here")
        model, meta = load_checkpoint(stems[0])
        if meta.get("rows_per_class", 1) > 1:
            model = RowUnion(model, meta["prompt_ids"], meta["rows_per_class"])
        model.eval()
        t0 = time.time()
        row = evaluate_heldout(model, items, names, _prompt_map(meta, names), held)
        row["seconds"] = round(time.time() - t0, 1)
        # What was fine-tuned and how much of it, for scripts/prompt_budget_plot.py.
        row["checkpoint"] = str(stems[0])
        row |= {k: meta[k] for k in ("mode", "trainable", "total", "rows_per_class", "deep")
                if k in meta}
        results["rows"][label] = row
        print(f"{label:30s} held-out SDR {row['held_out']['sdr']:6.2f} (n {row['held_out']['n']})"
              f"  all SDR {row['all']['sdr']:6.2f}"
              + (f"  others {row['others']['sdr']:6.2f}" if row["others"] else ""), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


def derangement(n: int, seed: int) -> list[int]:
    """A random permutation of range(n) with no fixed point (every id moves)."""
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return [int(x) for x in p]


def random_queries_cmd(args: argparse.Namespace) -> int:
    """Random query assignment at test time: every class id is replaced through a fixed
    derangement of the vocabulary, the trained model untouched."""
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [i.name for i in load_vocabulary()]
    pairs, _ = load_items(args.data, args.seconds, args.max_pairs, 0)
    model, _ = load_checkpoint(args.ckpt)
    model.eval()
    perm = derangement(len(names), args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"n_pairs": len(pairs), "permutation": perm, "rows": {},
                               "command": "python -m training.prompts " + " ".join(sys.argv[1:])}
    for label, id_of in (("named queries", {}),
                         ("random query assignment", {c: perm[i] for i, c in enumerate(names)})):
        t0 = time.time()
        row = evaluate_heldout(model, pairs, names, id_of, [])["all"]
        row["seconds"] = round(time.time() - t0, 1)
        results["rows"][label] = row
        print(f"{label:30s} SDR {row['sdr']:6.2f} SIR {row['sir']:6.2f} SAR {row['sar']:6.2f}",
              flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ft = sub.add_parser("finetune", help="add prompts to a pre-trained model and fine-tune")
    ft.add_argument("--data", type=Path, required=True, help="SynthMUSIC (or MUSIC) root")
    ft.add_argument("--init", type=Path, required=True, help="pre-trained checkpoint stem")
    ft.add_argument("--classes", required=True, help="held-out class names, comma-separated")
    ft.add_argument("--mode", choices=MODES, default="prompt",
                    help="prompt: train only the new query rows; full: the whole network; "
                         "decoder / unet: the rows plus everything outside / inside the audio "
                         "U-Net (a diagnostic split) (default %(default)s)")
    ft.add_argument("--rows", type=int, default=1,
                    help="prompt rows per held-out class; > 1 joins their masks (RowUnion: a "
                         "variant beside the paper's one row) (default %(default)s)")
    ft.add_argument("--deep", action="store_true",
                    help="deep prompts: each row also adds a learned vector to its query before "
                         "every audio-aware layer and the mask MLP (a variant beside the "
                         "paper's one row; other classes' paths stay unchanged)")
    ft.add_argument("--out", type=Path, required=True,
                    help="folder for best.safetensors/.json and summary.json")
    ft.add_argument("--minutes", type=float, default=None,
                    help="wall-time budget (give this and/or --steps)")
    ft.add_argument("--steps", type=int, default=None, help="step budget")
    ft.add_argument("--batch", type=int, default=8, help="mixtures per step (default %(default)s)")
    ft.add_argument("--n-mix", type=int, default=2,
                    help="K solo clips per mixture, one of a held-out class (default 2, as the "
                         "paper and the test pairs; also from a K=3 pre-training like the "
                         "shipped one: K=3 here costs ~2 dB on K=2 pairs, docs/RESULTS.md "
                         "section 54)")
    ft.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="as training.train: bf16 autocast where the device runs it natively "
                         "(default auto)")
    ft.add_argument("--lr-prompt", type=float, default=1e-1,
                    help="Adam LR of the new rows (prompt mode) (default %(default)s; chosen "
                         "on val in docs/RESULTS.md section 17; sections 7 and 15 ran 3e-3)")
    ft.add_argument("--lr-offsets", type=float, default=None,
                    help="Adam LR of deep prompts' per-layer offsets (--deep) (default: "
                         "--lr-prompt's; 1e-2 and 3e-2 were no better on val, docs/RESULTS.md "
                         "section 54)")
    ft.add_argument("--lr-transformer", type=float, default=3e-4,
                    help="AdamW LR of the transformer and query side (full, decoder, unet "
                         "modes) (default %(default)s)")
    ft.add_argument("--lr-audio", type=float, default=1e-3,
                    help="Adam LR of the audio U-Net (full, unet modes) (default %(default)s)")
    ft.add_argument("--val-every", type=int, default=150,
                    help="steps between validations (the best is kept) (default %(default)s)")
    ft.add_argument("--val-mixtures", type=int, default=32,
                    help="fixed val mixtures, each holding a held-out class (default %(default)s)")
    ft.add_argument("--seed", type=int, default=0, help="seed of the training mixtures")
    ft.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ev = sub.add_parser("evaluate", help="SDR on the test (or val) pairs holding held-out classes")
    ev.add_argument("--data", type=Path, required=True, help="SynthMUSIC (or MUSIC) root")
    ev.add_argument("--classes", required=True, help="held-out class names, comma-separated")
    ev.add_argument("--ckpt", action="append", default=[],
                    help="LABEL=PATH, a checkpoint stem (repeatable; fine-tuned ones name the "
                         "held-out classes by their prompts)")
    ev.add_argument("--out", type=Path, required=True, help="folder for results.json")
    ev.add_argument("--seconds", type=float, default=6.0,
                    help="seconds of each test pair scored (default %(default)s)")
    ev.add_argument("--pairs-from", choices=["test", "val"], default="test",
                    help="score the test pairs (default) or pairs of val clips, drawn as "
                         "training.evaluate draws them: for choices between fine-tuned "
                         "models, which never look at test")
    ev.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    rq = sub.add_parser("random-queries", help="random query assignment ablation")
    rq.add_argument("--data", type=Path, required=True, help="SynthMUSIC (or MUSIC) root")
    rq.add_argument("--ckpt", type=Path, required=True, help="checkpoint stem")
    rq.add_argument("--out", type=Path, required=True, help="folder for results.json")
    rq.add_argument("--seconds", type=float, default=6.0,
                    help="seconds of each test pair scored (default %(default)s)")
    rq.add_argument("--max-pairs", type=int, default=None, help="score the first N pairs only")
    rq.add_argument("--seed", type=int, default=0,
                    help="seed of the random assignment (default %(default)s)")
    rq.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args(argv)
    if args.cmd == "finetune" and args.minutes is None and args.steps is None:
        ap.error("give --minutes and/or --steps")
    if args.cmd == "finetune" and args.rows < 1:
        ap.error(f"--rows must be >= 1, got {args.rows}")
    if args.cmd == "finetune" and args.lr_offsets is not None and not (
            args.deep and args.mode == "prompt"):
        # Said rather than ignored: without deep prompts there are no offsets to give an LR.
        ap.error("--lr-offsets sets deep prompts' LR: it needs --mode prompt --deep")
    if args.cmd == "finetune" and args.n_mix < 2:
        ap.error(f"--n-mix must be >= 2 (one held-out class and the others), got "
                 f"{args.n_mix}")
    try:
        return {"finetune": finetune, "evaluate": evaluate_cmd,
                "random-queries": random_queries_cmd}[args.cmd](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
