"""Mix-and-Separate training of iQuery (with or without its motion layer) or Sound-of-Pixels on
cached visual features:

    python -m training.train --data data/synth --preset cpu --model iquery --minutes 20 \
        --out runs/iquery

Ratio-mask targets (|S_k| / |S_mix| clamped to [0, 1], the published code's; --mask-target
sources divides by the sum of the sources' magnitudes instead) on the warped grid, L1 weighted
by log1p of the warped mixture magnitude (the paper's; --loss-weight mag / source weigh the
bins as SDR does, an ablation in docs/RESULTS.md section 20); AdamW for the transformer, Adam
for the audio network; a step LR schedule scaled to the budget (x0.1 at 80%; --lr-steps 0.4,0.8
for Sound-of-Pixels' published two drops; --lr-schedule linear decays every LR linearly to zero
at the end of the budget instead, --lr-schedule anneal only over the last fifth, --lr-schedule
cosine along half a cosine); validation SDR on a fixed set of val mixtures, best kept by val
only.
<out>/last/ is a resumable state (model, optimizers, RNGs: safetensors + JSON, no pickle),
<out>/best.* the best model.
torchrun runs it data-parallel (gloo on CPU). --precision auto (the default) runs the forward
pass under bfloat16 autocast where the CPU or GPU computes in bf16 (1.14-1.4x the steps in
the same minutes on this project's CPUs: docs/RESULTS.md sections 13, 40), float32
elsewhere; a step with non-finite gradients is skipped, and under bf16 it switches the run to
float32 (some CPUs' AMX bf16 kernels return NaN: section 16), logged and recorded in
summary.json.
--contrastive-weight W > 0 adds W * info_nce (the paper's auxiliary contrastive loss, Table 6)
to the iQuery loss; 0 (the default) is the plain Mix-and-Separate step.
--motion-e2e INIT trains the motion encoder with the separator (from the pretrained encoder
INIT, or `random`) on crop tubes cached by `training.encoders --tubes`, instead of reading
frozen motion tokens; it is saved beside the separator as <out>/best_motion_encoder.
--ema D keeps an exponential moving average of the weights (and BatchNorm statistics), each
step avg = D * avg + (1 - D) * weights; validation scores, and best/ holds, the average.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from models.checkpoint import load_checkpoint, save_checkpoint
from models.features import MEAN, STD
from models.spectral import apply_masks, istft, stft, warp
from models.unet import token_strides
from models.visual import MotionEncoder
from training.factory import PRESETS, build_model
from training.instruments import load_vocabulary
from training.metrics import bss_eval_shared
from training.mixdata import MixSampler, load_solo

MODELS = ("iquery", "iquery_nomotion", "sop")


def make_model(name: str, preset: str, **overrides: Any) -> nn.Module:
    """'iquery' | 'iquery_nomotion' (no motion-aware layer) | 'sop' with the preset's sizes."""
    if name == "iquery":
        return build_model(preset, "iquery", **overrides)
    if name == "iquery_nomotion":
        return build_model(preset, "iquery", **({"n_motion_layers": 0} | overrides))
    if name == "sop":
        return build_model(preset, "sop", **overrides)
    raise ValueError(f"unknown model {name!r}; choose one of {list(MODELS)}")


class MotionEndToEnd(nn.Module):
    """Training-time pair: a separator and the motion encoder trained with it. Its forward
    takes crop tubes (B, K, Tm, H, W, 3), pixel values 0..255, where the separator takes
    motion tokens; everything else is passed through. The encoder runs on each window's tube
    alone (its time convolutions see zero padding at the window's edges, where the cached
    tokens of a whole clip see the neighbouring frames)."""

    def __init__(self, separator: nn.Module, motion_encoder: MotionEncoder) -> None:
        super().__init__()
        self.separator, self.motion_encoder = separator, motion_encoder

    def forward(self, x: Tensor, obj: Tensor, class_ids: Tensor, tube: Tensor,
                tube_pad: Tensor, query_pad: Tensor, **kw: Any) -> Tensor:
        b, k = tube.shape[:2]
        v = ((tube / 255.0 - MEAN) / STD).flatten(0, 1).permute(0, 4, 1, 2, 3)  # (BK,3,T,H,W)
        tokens = self.motion_encoder(v).unflatten(0, (b, k))  # (B, K, Tm, D)
        return self.separator(x, obj, class_ids, tokens, tube_pad, query_pad, **kw)


def save_model(stem: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """A separator's checkpoint at `stem`; a MotionEndToEnd pair adds its motion encoder at
    <stem>_motion_encoder (each a checkpoint that the engine and encoders.py load alone)."""
    if isinstance(model, MotionEndToEnd):
        save_checkpoint(stem.with_name(stem.name + "_motion_encoder"), model.motion_encoder,
                        meta | {"trained_with": str(stem)})
        model = model.separator
    save_checkpoint(stem, model, meta)


def load_model_weights(stem: Path, model: nn.Module) -> None:
    """Load what save_model wrote at `stem` into `model` (strict)."""
    if isinstance(model, MotionEndToEnd):
        enc, _ = load_checkpoint(stem.with_name(stem.name + "_motion_encoder"))
        model.motion_encoder.load_state_dict(enc.state_dict())
        model = model.separator
    saved, _ = load_checkpoint(stem)
    model.load_state_dict(saved.state_dict())


LOSS_WEIGHTS = ("log1p", "mag", "source")
MASK_TARGETS = ("mix", "sources")


def ratio_mask(mag_src: Tensor, mag_mix: Tensor, kind: str = "mix") -> Tensor:
    """Training target on the warped grid: mag_src (B, K, rows, T), mag_mix (B, 1, rows, T) ->
    (B, K, rows, T) in [0, 1].

    mix: |S_k| / |S_mix| clamped to [0, 1], the published code's (where sources cancel in the
      mixture, |S_mix| < |S_k| and the clamp cuts the target).
    sources: |S_k| / sum_j |S_j|, the form of the oracle's ideal ratio mask: the K targets of a
      bin sum to one and need no clamp (on the 256-row grid this oracle scores 0.33-0.43 dB
      above `mix` on the val and test pairs and the ensembles, docs/RESULTS.md section 39)."""
    if kind == "mix":
        return (mag_src / mag_mix.clamp_min(1e-8)).clamp(0, 1)
    if kind == "sources":
        return mag_src / mag_src.sum(1, keepdim=True).clamp_min(1e-8)
    raise ValueError(f"unknown mask target {kind!r}: choose one of {', '.join(MASK_TARGETS)}")


def loss_weight(mag_mix: Tensor, mag_src: Tensor, kind: str = "log1p") -> Tensor:
    """Per-bin weight of the mask L1: mag_mix (B, 1, rows, T), mag_src (B, K, rows, T) ->
    (B, 1 or K, rows, T).

    log1p: log1p(|S_mix|) clamped to [1e-3, 10], the paper's and its published code's.
    mag: |S_mix| / its mean over the window, so the loss is the L1 error of the separated
      magnitude (|S_mix| |m - m*|): loud bins count as they do in SDR's error energy.
    source: |S_mix| / the mean of |S_k| over the window, per source: each source's relative
      magnitude error, as SDR is relative to each source's own energy (a quiet source counts
      as much as a loud one). The denominator is floored at a tenth of the mixture's mean so
      that a source silent in the window does not blow the weight up."""
    if kind == "log1p":
        return torch.log1p(mag_mix).clamp(1e-3, 10)
    mix_mean = mag_mix.mean((2, 3), keepdim=True).clamp_min(1e-8)
    if kind == "mag":
        return mag_mix / mix_mean
    if kind == "source":
        return mag_mix / torch.maximum(mag_src.mean((2, 3), keepdim=True), 0.1 * mix_mean)
    raise ValueError(f"unknown loss weight {kind!r}: choose one of {', '.join(LOSS_WEIGHTS)}")


def to_tensors(batch: dict[str, np.ndarray], n_rows: int, device: torch.device,
               weighting: str = "log1p", target: str = "mix") -> dict[str, Tensor]:
    """Sampled numpy batch -> model inputs, targets and loss weights (all on device).

    x (B, 1, n_rows, T); target (B, K, n_rows, T) = ratio_mask(..., target) on the warped
    grid; weight (B, 1 or K, n_rows, T) from loss_weight(..., weighting)."""
    src = torch.from_numpy(batch["sources"]).to(device)  # (B, K, N)
    spec_src = stft(src)  # (B, K, 512, T)
    spec_mix = spec_src.sum(1)  # = stft(src.sum(1)): the STFT is linear, so no STFT of the mix
    mag_src = warp(spec_src.abs(), n_rows)  # (B, K, rows, T)
    mag_mix = warp(spec_mix.abs().unsqueeze(1), n_rows)  # (B, 1, rows, T)
    weight = loss_weight(mag_mix, mag_src, weighting)
    # model_input(spec_mix, n_rows) is log1p of this same warped magnitude: reuse it.
    out = {"x": torch.log1p(mag_mix), "target": ratio_mask(mag_src, mag_mix, target),
           "weight": weight,
           "spec_mix": spec_mix, "sources": src}
    for k in ("obj", "class_ids", "motion", "motion_pad"):
        out[k] = torch.from_numpy(batch[k]).to(device)
    out["query_pad"] = torch.zeros(out["class_ids"].shape, dtype=torch.bool, device=device)
    return out


def forward(model: nn.Module, t: dict[str, Tensor]) -> Tensor:
    """-> masks (B, K, n_rows, T)."""
    return model(t["x"], t["obj"], t["class_ids"], t["motion"], t["motion_pad"], t["query_pad"])


def forward_with_embeddings(model: nn.Module, t: dict[str, Tensor]
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """-> masks (B, K, n_rows, T), visual queries (B, K, D), audio-decoded queries (B, K, D).

    Called through the model's forward (not the method) so that a DistributedDataParallel
    wrapper syncs the gradients of this pass."""
    if not hasattr(_unwrap(model), "forward_with_embeddings"):
        raise ValueError(f"the contrastive loss needs a model with queries (iQuery), got "
                         f"{type(_unwrap(model)).__name__}")
    return model(t["x"], t["obj"], t["class_ids"], t["motion"], t["motion_pad"], t["query_pad"],
                 return_embeddings=True)


def mask_loss(masks: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Weighted L1 between predicted and ratio masks."""
    return (weight * (masks - target).abs()).mean()


def info_nce(audio_q: Tensor, visual_q: Tensor, query_pad: Tensor,
             temperature: float = 0.1) -> Tensor:
    """Auxiliary contrastive loss: audio_q, visual_q (B, K, D), query_pad (B, K) bool -> ().

    The N unpadded sources of the batch (all B * K slots less the padded ones) give an (N, N)
    matrix of cosine similarities / temperature between audio-decoded queries (rows) and
    visual queries (columns); the diagonal pairs (a source's own two embeddings) are the
    positives, every other source of the batch, in the same mixture or another, a negative.
    Padded slots are dropped before the matrix is built, so their embeddings cannot matter.

    Symmetric, the mean of the row-wise (audio -> visual) and column-wise (visual -> audio)
    cross-entropies, as in CLIP: both embeddings are trained here (the visual query comes from
    the learned query table, the object projection and the motion layer), and the audio ->
    visual term alone normalises over visual candidates only, so a visual query never has to
    pick out its own audio query among the others; the second term asks that of it at the
    cost of one more log-softmax over the same matrix. Cosine (unit vectors) keeps the
    logits within +-1 / temperature whatever the embedding norms.
    """
    assert audio_q.shape == visual_q.shape and audio_q.shape[:2] == query_pad.shape, (
        f"audio_q {tuple(audio_q.shape)}, visual_q {tuple(visual_q.shape)}, "
        f"query_pad {tuple(query_pad.shape)} do not match")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    keep = ~query_pad.reshape(-1)  # (B*K,)
    a = F.normalize(audio_q.reshape(-1, audio_q.shape[-1])[keep], dim=-1)  # (N, D)
    v = F.normalize(visual_q.reshape(-1, visual_q.shape[-1])[keep], dim=-1)  # (N, D)
    if a.shape[0] == 0:
        return a.new_zeros(())
    logits = a @ v.T / temperature  # (N, N): rows audio, columns visual
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the system.

    A training step allocates and frees the same large activations (16 MB each at 256 rows)
    every step; by default glibc hands blocks that large back with munmap and the next step
    page-faults them in again. Keeping them, with fused Adam, times the step 1.22-1.27x faster
    in scripts/bench_train_step.py; 55-minute runs made 1.03-1.12x the steps (docs/RESULTS.md
    section 32). Costs only resident memory (the peak of one step, ~1.2 GB at 256 rows).
    Returns False, changing nothing, where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's <malloc.h>
    # 32 MiB is glibc's largest mmap threshold: blocks below it come from the reusable heap.
    return bool(mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 1 << 30)
                and mallopt(m_top_pad, 64 << 20))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def make_optimizers(model: nn.Module, lr_transformer: float, lr_audio: float
                    ) -> list[torch.optim.Optimizer]:
    """AdamW (wd 1e-4) for the transformer / query side, Adam for the audio U-Net (and, for
    Sound-of-Pixels, everything: it has no transformer)."""
    net = _unwrap(model)
    sep = net.separator if isinstance(net, MotionEndToEnd) else net
    audio, rest = [], []
    for name, p in sep.named_parameters():
        if p.requires_grad:
            (audio if name.startswith("unet.") or not hasattr(sep, "audio_self")
             else rest).append(p)
    if isinstance(net, MotionEndToEnd):  # a visual network: Adam, as the paper's "rest"
        audio += [p for p in net.motion_encoder.parameters() if p.requires_grad]
    opts: list[torch.optim.Optimizer] = []
    if audio:  # empty when the U-Net is frozen (prompts' `decoder` mode)
        opts.append(torch.optim.Adam(audio, lr=lr_audio, fused=True))
    if rest:
        opts.append(torch.optim.AdamW(rest, lr=lr_transformer, weight_decay=1e-4, fused=True))
    return opts


# ------------------------------------------------------------------------ resumable state
def _opt_state(opts: list[torch.optim.Optimizer]) -> tuple[dict[str, Tensor], list]:
    tensors: dict[str, Tensor] = {}
    groups = []
    for i, opt in enumerate(opts):
        sd = opt.state_dict()
        for pid, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"opt{i}.{pid}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        groups.append(sd["param_groups"])
    return tensors, groups


def _load_opt_state(opts: list[torch.optim.Optimizer], tensors: dict[str, Tensor],
                    groups: list) -> None:
    for i, opt in enumerate(opts):
        state: dict[int, dict[str, Tensor]] = {}
        for key, v in tensors.items():
            if key.startswith(f"opt{i}."):
                _, pid, k = key.split(".", 2)
                state.setdefault(int(pid), {})[k] = v
        opt.load_state_dict({"state": state, "param_groups": groups[i]})


def save_state(folder: Path, model: nn.Module, opts: list[torch.optim.Optimizer],
               sampler: MixSampler, info: dict[str, Any],
               ema: AveragedModel | None = None) -> None:
    """Write a resumable state to `folder` atomically: build it in a sibling temp folder, then
    swap it in (a kill at any point leaves `folder` or `folder`.old complete)."""
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp / "model", _unwrap(model), {"step": info["step"]})
    if ema is not None:
        save_model(tmp / "ema", ema.module, {"step": info["step"],
                                             "ema_updates": int(ema.n_averaged)})
    tensors, groups = _opt_state(opts)
    tensors["torch_rng"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "train.safetensors"))
    (tmp / "train.json").write_text(json.dumps(
        info | {"param_groups": groups, "sampler_rng": sampler.rng.bit_generator.state},
        indent=1) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_state(folder: Path, model: nn.Module, opts: list[torch.optim.Optimizer],
               sampler: MixSampler, ema: AveragedModel | None = None) -> dict[str, Any]:
    """Restore what save_state wrote (falls back to `folder`.old after an interrupted swap).
    A state saved without an average starts `ema` from the restored weights."""
    if not (folder / "train.json").is_file():
        folder = folder.with_name(folder.name + ".old")
    load_model_weights(folder / "model", _unwrap(model))
    if ema is not None and (folder / "ema.json").is_file():
        load_model_weights(folder / "ema", ema.module)
        ema.n_averaged.fill_(json.loads((folder / "ema.json").read_text())["meta"]
                             ["ema_updates"])
    info = json.loads((folder / "train.json").read_text())
    tensors = load_file(str(folder / "train.safetensors"))
    torch.set_rng_state(tensors.pop("torch_rng"))
    _load_opt_state(opts, tensors, info.pop("param_groups"))
    sampler.rng.bit_generator.state = info.pop("sampler_rng")
    return info


def has_state(folder: Path) -> bool:
    return (folder / "train.json").is_file() or (
        folder.with_name(folder.name + ".old") / "train.json").is_file()


# ------------------------------------------------------------------------------ validation
@torch.no_grad()
def validate(model: nn.Module, val_batches: list[dict[str, np.ndarray]], n_rows: int,
             device: torch.device) -> dict[str, float]:
    """Mean SDR/SIR/SAR (dB) and loss over fixed val mixtures (one window each).

    BSS-eval through bss_eval_shared (mir_eval's numbers, ~2.8x faster at K=3): at mir_eval's
    speed the 48 val mixtures took 13.5 s, 14 % of a 55-minute run validating every 1000
    steps."""
    was = model.training
    model.eval()
    sdr, sir, sar, losses = [], [], [], []
    for batch in val_batches:
        t = to_tensors(batch, n_rows, device)
        masks = forward(model, t)
        losses.append(float(mask_loss(masks, t["target"], t["weight"])))
        est = istft(apply_masks(masks, t["spec_mix"]), t["sources"].shape[-1]).cpu().numpy()
        ref = t["sources"].cpu().numpy()
        for b in range(len(ref)):
            m = bss_eval_shared(ref[b], est[b])
            sdr += list(m["sdr"])
            sir += list(m["sir"])
            sar += list(m["sar"])
    model.train(was)
    return {"sdr": float(np.mean(sdr)), "sir": float(np.mean(sir)), "sar": float(np.mean(sar)),
            "loss": float(np.mean(losses))}


# One x0.1 drop at 80% of the budget. Sound-of-Pixels' published schedule (train_MUSIC.sh:
# --num_epoch 100 --lr_steps 40 80) scaled to a 55-minute budget (--lr-steps 0.4,0.8) ended
# 1.1 dB (iQuery) and 0.8 dB (Sound-of-Pixels) lower on val: docs/RESULTS.md section 12.
LR_STEPS = (0.8,)


LR_SCHEDULES = ("step", "linear", "anneal", "cosine")


def lr_factor(progress: float, steps: tuple[float, ...] = LR_STEPS,
              schedule: str = "step") -> float:
    """The LR's factor at `progress` (0..1 of the budget). "step": x0.1 at each fraction in
    `steps` passed. "linear": 1 at the start down to 0 at the end of the budget (every step
    anneals, rather than the last 20 % at a tenth of the LR). "anneal": 1 until the first
    fraction in `steps`, then linearly down to 0 at the end (a warm-stable-decay cool-down: the
    step schedule's full-LR stretch, its drop spread over the rest of the budget). "cosine":
    half a cosine from 1 at the start to 0 at the end (the LR stays near its peak longer than
    the linear decay's, and lands more gently than a step)."""
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    if schedule == "anneal":
        if not steps:
            raise ValueError("the anneal LR schedule starts at the first of --lr-steps: give one")
        start = min(steps)
        return 1.0 if progress < start else max(0.0, (1.0 - progress) / (1.0 - start))
    if schedule != "step":
        raise ValueError(f"LR schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    return 0.1 ** sum(progress >= s for s in steps)


def mix_size(progress: float, n_mix: int, n_mix_final: int | None,
             steps: tuple[float, ...] = LR_STEPS) -> int:
    """K of the training mixtures at `progress` (0..1 of the budget): n_mix, then n_mix_final
    (when given) from the first LR drop on."""
    if n_mix_final is None or not steps or progress < min(steps):
        return n_mix
    return n_mix_final


def set_lr(opts: list, base_lrs: list[list[float]], progress: float,
           steps: tuple[float, ...] = LR_STEPS, schedule: str = "step") -> None:
    """Apply the schedule at `progress` (0..1 of the budget) to every param group."""
    factor = lr_factor(progress, steps, schedule)
    for o, lrs in zip(opts, base_lrs, strict=True):
        for g, lr in zip(o.param_groups, lrs, strict=True):
            g["lr"] = lr * factor


class NonFiniteStep(RuntimeError):
    """A training step whose loss or gradients were not finite: no parameter was updated."""


class PrecisionGuard:
    """Keeps a run alive through non-finite steps, and says so.

    train_step skips a step whose loss or gradients are not finite (the parameters stay as
    they were). Under bf16 autocast the first such step switches the run to float32 for good:
    on some CPUs oneDNN's AMX bf16 kernels return NaN gradients (seen on a Xeon with AMX and
    AVX512-FP16, for iQuery and Sound-of-Pixels alike within the first ~50 steps, where float32
    trained cleanly: docs/RESULTS.md section 16), and before this guard such a run went on in
    NaN for its whole budget. In float32, `patience` non-finite steps in a row mean the run
    diverged: a one-line error."""

    def __init__(self, precision: str, patience: int = 20, skipped: int = 0,
                 fallback_step: int | None = None) -> None:
        self.precision, self.patience = precision, patience
        self.skipped, self.in_a_row, self.fallback_step = skipped, 0, fallback_step

    def passed(self) -> None:
        self.in_a_row = 0

    def failed(self, step: int) -> str:
        """Record a skipped step after `step` completed ones -> the line to print. Raises
        ValueError after `patience` skipped steps in a row in float32."""
        self.skipped += 1
        self.in_a_row += 1
        if self.precision == "bf16":
            self.precision, self.fallback_step, self.in_a_row = "fp32", step, 0
            return (f"step {step}: non-finite gradients under bf16 autocast, step skipped; "
                    f"the run goes on in float32 (--precision fp32 starts it so)")
        if self.in_a_row >= self.patience:
            raise ValueError(f"training diverged: {self.in_a_row} steps in a row with a "
                             f"non-finite loss or gradients after step {step}; lower the "
                             f"learning rates or resume from an earlier state")
        return f"step {step}: non-finite loss or gradients, step skipped"

    def state(self) -> dict[str, Any]:
        return {"precision": self.precision, "skipped_steps": self.skipped,
                "precision_fallback_step": self.fallback_step}


def train_step(model: nn.Module, opts: list, sampler: Any, batch: int, n_rows: int,
               device: torch.device, contrastive_weight: float = 0.0,
               temperature: float = 0.1, stats: dict[str, float] | None = None,
               precision: str = "fp32", weighting: str = "log1p",
               target: str = "mix") -> torch.Tensor:
    """One Mix-and-Separate step: sample `batch` mixtures, weighted L1 on the ratio masks
    (+ contrastive_weight * info_nce when the weight is > 0, iQuery only), step every
    optimizer. Returns the loss (detached from nothing: for logging only); `stats`, if
    given, receives the float terms "mask" and "contrastive" (0.0 when the weight is 0).

    A weight of 0 runs exactly the plain step (no embeddings, no extra work). precision
    "bf16" runs the forward pass under bfloat16 autocast (weights, optimizer state and the
    loss stay float32); "fp32" runs it all in float32. A non-finite loss or gradient raises
    NonFiniteStep and leaves the model as it was: no optimizer step, BatchNorm statistics
    restored (see PrecisionGuard). weighting picks the mask loss's per-bin weight
    (loss_weight), target its ratio mask (ratio_mask)."""
    t = to_tensors(sampler.sample(batch), n_rows, device, weighting, target)
    saved = [b.detach().clone() for b in model.buffers()]  # BatchNorm statistics, for a skip
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        if contrastive_weight > 0:
            masks, visual_q, audio_q = forward_with_embeddings(model, t)
        else:
            masks, visual_q, audio_q = forward(model, t), None, None
    mask_term = mask_loss(masks.float(), t["target"], t["weight"])
    if visual_q is not None:
        nce = info_nce(audio_q.float(), visual_q.float(), t["query_pad"], temperature)
        loss = mask_term + contrastive_weight * nce
    else:
        loss, nce = mask_term, None
    if stats is not None:
        stats["mask"] = mask_term.item()
        stats["contrastive"] = 0.0 if nce is None else nce.item()
    for o in opts:
        o.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for o in opts for g in o.param_groups for p in g["params"]
             if p.grad is not None]
    if not (torch.isfinite(loss) and torch.isfinite(torch.nn.utils.get_total_norm(grads))):
        for o in opts:
            o.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, b0 in zip(model.buffers(), saved, strict=True):
                b.copy_(b0)
        raise NonFiniteStep(f"loss {loss.item()}: non-finite loss or gradients")
    for o in opts:
        o.step()
    return loss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--data", type=Path, required=True,
                    help="SynthMUSIC (or MUSIC) root, with its feature cache (training.encoders)")
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                    help="model size: cpu (default; 3 M parameters) or paper (46 M, a GPU's)")
    ap.add_argument("--model", default="iquery", choices=MODELS)
    ap.add_argument("--out", type=Path, required=True,
                    help="run folder: best/last checkpoints, summary.json, tb/ (TensorBoard); "
                         "an existing last/ is resumed")
    ap.add_argument("--minutes", type=float, default=None, help="wall-time budget")
    ap.add_argument("--steps", type=int, default=None, help="step budget (first reached ends)")
    ap.add_argument("--batch", type=int, default=8, help="mixtures per step (default 8)")
    ap.add_argument("--n-mix", type=int, default=2,
                    help="K solo clips of different classes per mixture (the paper trains on "
                    "2; the shipped cpu model on 3)")
    ap.add_argument("--n-mix-final", type=int, default=None, metavar="K",
                    help="K from the first LR drop on (a curriculum: e.g. --n-mix 3 "
                         "--n-mix-final 2 trains on three-clip mixtures and finishes on the "
                         "test's two); validation mixes K clips throughout, so that the best "
                         "checkpoint is picked on one K (default: --n-mix throughout)")
    ap.add_argument("--lr-transformer", type=float, default=1e-4,
                    help="AdamW LR of the transformer and visual layers (default 1e-4)")
    ap.add_argument("--lr-audio", type=float, default=1e-3,
                    help="Adam LR of the audio U-Net (default 1e-3)")
    ap.add_argument("--lr-steps", default=",".join(str(f) for f in LR_STEPS),
                    help="fractions of the budget where every LR drops x0.1 (default 0.8; "
                         "0.4,0.8 is Sound-of-Pixels' published --lr_steps 40 80 of 100 epochs)")
    ap.add_argument("--lr-schedule", default="step", choices=LR_SCHEDULES,
                    help="step (default): x0.1 at each of --lr-steps; linear: every LR "
                         "decays linearly to zero at the end of the budget (--lr-steps then "
                         "only marks where --n-mix-final switches K; 0.24 dB under step on "
                         "seed 4's test pairs, docs/RESULTS.md section 38); anneal: full LR "
                         "until the first of --lr-steps, then linearly down to zero at the end "
                         "(level with step on two seeds, docs/RESULTS.md section 45); cosine: "
                         "half a cosine from the full LR to zero at the end of the budget "
                         "(level with step on seed 7's test pairs, 0.2 dB under it on the val "
                         "pairs, docs/RESULTS.md section 61)")
    ap.add_argument("--val-every", type=int, default=200,
                    help="steps between validations; the best val SDR is kept (default 200)")
    ap.add_argument("--val-mixtures", type=int, default=48,
                    help="fixed val mixtures scored at each validation (default 48)")
    ap.add_argument("--features", type=Path, default=None,
                    help="feature cache (default <data>/features)")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights and mixtures (default 0)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto (default): a GPU per local process when there are enough, else "
                         "the CPU")
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bar (for logs); validations are printed either way")
    ap.add_argument("--exclude-classes", default="",
                    help="comma-separated class names left out of training and validation "
                         "(pre-training for audio prompts, training/prompts.py)")
    ap.add_argument("--contrastive-weight", type=float, default=0.0,
                    help="weight W of the auxiliary contrastive loss (audio-decoded query vs "
                         "its visual query, InfoNCE); 0: off (default), iquery models only")
    ap.add_argument("--contrastive-temperature", type=float, default=0.1,
                    help="InfoNCE temperature (cosine similarities / T); default 0.1")
    ap.add_argument("--n-rows", type=int, default=None,
                    help="frequency rows of the warped grid, replacing the preset's (cpu: 128, "
                         "paper: 256): a finer grid raises the mask's ceiling and the cost")
    ap.add_argument("--ngf", type=int, default=None,
                    help="U-Net base width, replacing the preset's (cpu: 16, paper: 64): more "
                         "capacity, ~2x the step cost per doubling")
    ap.add_argument("--n-frames", type=int, default=None,
                    help="STFT frames per training window, replacing the preset's (cpu: 64, "
                         "~1.5 s; paper: 256): more time context per mask, ~2x the step cost "
                         "per doubling at a fixed --batch; a multiple of 2^(U-Net depth)")
    ap.add_argument("--mask-dim", type=int, default=None,
                    help="channels of the audio embedding at full resolution that the masks "
                         "are read from (iQuery's mask_dim, Sound-of-Pixels' audio channels), "
                         "replacing the preset's (32, as both papers): the U-Net's outer "
                         "transposed convolution, the widest layer, scales with it (16: 1.07x "
                         "the steps in a real run, ~0.3 dB lower val per step, docs/RESULTS.md "
                         "section 46)")
    ap.add_argument("--token-stride", type=int, default=None,
                    help="stride of the U-Net decoder map whose cells are the audio tokens the "
                         "transformer's queries attend to, replacing the preset's (16); a power "
                         "of 2 below 2^(U-Net depth). iquery models only. 8 on the cpu preset's "
                         "256x64 window gives 32x8 = 256 tokens, the paper's count (16x16 at "
                         "stride 16 on its 256x256 window), at 1.13x the step's time "
                         "(scripts/bench_train_step.py --token-strides 16,8)")
    ap.add_argument("--audio-layers", type=int, default=None,
                    help="audio-aware decoder layers (self-attention across the queries, "
                         "cross-attention to the audio tokens, FFN), replacing the preset's (3, "
                         "as the paper); iquery models only")
    ap.add_argument("--dropout", type=float, default=None,
                    help="dropout of the transformer's attention and feed-forward layers, "
                         "replacing the preset's (0.1, as the paper's DETR-style decoder); "
                         "iquery models only (0 lost 0.34 dB on seed 4's test pairs, "
                         "docs/RESULTS.md section 38; 0.2 gained 0.11 dB at matched steps, "
                         "inside the spread of seeds, section 39)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="bf16: the forward pass under bfloat16 autocast (weights, optimizer "
                         "and loss stay float32; validation runs in float32): on a CPU with "
                         "AVX512-BF16 a 1.2-1.6x faster step in scripts/bench_model.py, "
                         "1.14-1.4x the steps in a 55-minute run; fp32: all float32; auto "
                         "(default): bf16 where the device runs it natively, else fp32. A "
                         "bf16 run whose gradients turn non-finite goes on in fp32")
    ap.add_argument("--loss-weight", default="log1p", choices=list(LOSS_WEIGHTS),
                    help="per-bin weight of the mask L1: log1p (default, the paper's: log1p of "
                         "the mixture magnitude), mag (the mixture magnitude: L1 on the "
                         "separated magnitude), source (mag divided by each source's mean "
                         "magnitude: every source's relative error). Validation loss stays "
                         "log1p, comparable across runs")
    ap.add_argument("--mask-target", default="mix", choices=list(MASK_TARGETS),
                    help="the ratio mask trained on: mix (default, the published code's: "
                         "|S_k| / |S_mix| clamped to [0, 1]) or sources (|S_k| / the sum of "
                         "the sources' magnitudes, the oracle IRM's form: +0.39 dB on seed "
                         "4's K=3 val windows, level on its test pairs at matched steps, "
                         "docs/RESULTS.md section 39). Validation loss stays mix, comparable "
                         "across runs")
    ap.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                    help="keep an exponential moving average of the weights with this decay "
                         "per step (e.g. 0.999: ~1000 steps of memory), validated and saved as "
                         "best/ in place of the raw weights; 0: off (default)")
    ap.add_argument("--motion-e2e", default=None, metavar="INIT",
                    help="train the motion encoder with the separator, from the MotionEncoder "
                         "checkpoint INIT or from `random`, on crop tubes (needs --features "
                         "cached by training.encoders --tubes; --model iquery only)")
    args = ap.parse_args(argv)
    if args.motion_e2e is not None and args.model != "iquery":
        ap.error(f"--motion-e2e needs --model iquery (the model with a motion layer), got "
                 f"{args.model}")
    if args.motion_e2e is not None and args.contrastive_weight > 0:
        ap.error("--motion-e2e and --contrastive-weight are not supported together")
    if args.minutes is None and args.steps is None:
        ap.error("give --minutes and/or --steps")
    if not 0.0 <= args.ema < 1.0:
        ap.error(f"--ema must be in [0, 1) (0: off), got {args.ema}")
    unit = 2 ** PRESETS[args.preset]["unet_depth"]
    for flag, value in (("--n-rows", args.n_rows), ("--n-frames", args.n_frames)):
        if value is not None and (value < unit or value % unit):
            # The U-Net halves both axes at every level, down to a single cell.
            ap.error(f"{flag} must be a positive multiple of {unit} for the {args.preset} "
                     f"preset's U-Net, got {value}")
    if args.mask_dim is not None and args.mask_dim < 1:
        ap.error(f"--mask-dim must be >= 1, got {args.mask_dim}")
    if args.dropout is not None and (args.model == "sop" or not 0.0 <= args.dropout < 1.0):
        ap.error(f"--dropout takes a value in [0, 1) for an iquery model, got {args.dropout} "
                 f"for {args.model}")
    strides = token_strides(PRESETS[args.preset]["unet_depth"])
    if args.token_stride is not None and (args.model == "sop" or args.token_stride not in strides):
        ap.error(f"--token-stride takes one of {strides} for an iquery model on the "
                 f"{args.preset} preset, got {args.token_stride} for {args.model}")
    if args.audio_layers is not None and (args.model == "sop" or args.audio_layers < 1):
        ap.error(f"--audio-layers takes a count >= 1 for an iquery model, got "
                 f"{args.audio_layers} for {args.model}")
    if args.n_mix < 2:
        ap.error(f"--n-mix must be >= 2 (a mixture of one clip has nothing to separate), "
                 f"got {args.n_mix}")
    try:
        args.lr_steps = tuple(float(f) for f in args.lr_steps.split(",") if f.strip())
    except ValueError:
        ap.error(f"--lr-steps: comma-separated fractions expected, got {args.lr_steps!r}")
    if any(not 0 < f < 1 for f in args.lr_steps):
        ap.error(f"--lr-steps: every fraction must be in (0, 1), got {args.lr_steps}")
    if args.n_mix_final is not None and args.n_mix_final < 2:
        ap.error(f"--n-mix-final must be >= 2, got {args.n_mix_final}")
    if args.n_mix_final is not None and not args.lr_steps:
        ap.error("--n-mix-final switches K at the first LR drop: give --lr-steps")
    if args.lr_schedule == "anneal" and not args.lr_steps:
        ap.error("--lr-schedule anneal starts its decay at the first of --lr-steps: give one")
    if args.contrastive_weight < 0:
        ap.error(f"--contrastive-weight must be >= 0, got {args.contrastive_weight}")
    if args.contrastive_weight > 0 and args.model == "sop":
        ap.error(f"--contrastive-weight {args.contrastive_weight} needs queries: choose "
                 f"--model iquery or iquery_nomotion (Sound-of-Pixels has none), got sop")
    if args.contrastive_temperature <= 0:
        ap.error(f"--contrastive-temperature must be > 0, got {args.contrastive_temperature}")
    try:
        return train(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def pick_device(name: str) -> torch.device:
    """--device -> this process's device. "auto": the GPU of this process's local rank when
    every local process has one (torchrun with more processes than GPUs runs all on the CPU,
    with gloo), else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    enough = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    if name == "cuda" and not enough:
        raise ValueError(f"--device cuda: torch sees {torch.cuda.device_count()} CUDA device(s) "
                         f"for {local_world} local process(es)")
    if name == "cuda" or (name == "auto" and enough):
        return torch.device(f"cuda:{local_rank}")
    return torch.device("cpu")


def pick_precision(name: str, device: torch.device) -> str:
    """--precision -> "fp32" or "bf16". "auto": bf16 where the hardware computes in it (a GPU
    that supports it; a CPU with AVX512-BF16 or AMX). Elsewhere bfloat16 is converted rather
    than computed in, so the speed-up measured here (docs/MODELS.md) is not expected."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    native = any(getattr(torch.cpu, f, lambda: False)()
                 for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return "bf16" if native else "fp32"


def train(args: argparse.Namespace) -> int:
    """The training loop behind the command line."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device(args.device)
    args.precision = pick_precision(args.precision, device)
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()
    torch.manual_seed(args.seed + rank)
    names = [inst.name for inst in load_vocabulary()]
    excluded = [c for c in args.exclude_classes.split(",") if c]
    for c in excluded:
        if c not in names:
            raise ValueError(f"--exclude-classes: unknown class {c!r}; choose from {names}")
    overrides = {k: v for k, v in (("n_rows", args.n_rows), ("ngf", args.ngf),
                                   ("n_frames", args.n_frames), ("dropout", args.dropout),
                                   ("mask_dim", args.mask_dim),
                                   ("token_stride", args.token_stride),
                                   ("n_audio_layers", args.audio_layers))
                 if v is not None}
    model = make_model(args.model, args.preset, **overrides)
    n_rows, n_frames, sep_kwargs = model.n_rows, model.n_frames, dict(model.kwargs)
    tubes = args.motion_e2e is not None
    if tubes:
        enc = (MotionEncoder(motion_dim=model.kwargs["motion_dim"], base_channels=16,
                             n_stages=1) if args.motion_e2e == "random"
               else load_checkpoint(args.motion_e2e)[0].train())
        if not isinstance(enc, MotionEncoder):
            raise ValueError(f"--motion-e2e {args.motion_e2e}: a MotionEncoder checkpoint or "
                             f"`random` expected, got a {type(enc).__name__}")
        model = MotionEndToEnd(model, enc)
    model = model.to(device)
    train_clips = [c for c in load_solo(args.data, "train", names, args.features, tubes=tubes)
                   if c.class_name not in excluded]
    val_clips = [c for c in load_solo(args.data, "val", names, args.features, tubes=tubes)
                 if c.class_name not in excluded]
    sampler = MixSampler(train_clips, n_frames, args.n_mix, seed=args.seed * 1000 + rank)
    k_final = args.n_mix_final or args.n_mix
    if len({c.class_id for c in train_clips}) < k_final:
        raise ValueError(f"--n-mix-final {k_final} needs clips of >= {k_final} classes")
    val_sampler = MixSampler(val_clips, n_frames, k_final, seed=12345, gain_db=0.0)
    val_batches = [val_sampler.sample(min(8, args.val_mixtures - i))
                   for i in range(0, args.val_mixtures, 8)]
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    opts = make_optimizers(model, args.lr_transformer, args.lr_audio)
    base_lrs = [[g["lr"] for g in o.param_groups] for o in opts]
    args.out.mkdir(parents=True, exist_ok=True)
    state_dir = args.out / "last"
    info: dict[str, Any] = {"step": 0, "elapsed": 0.0, "best_sdr": -1e9, "best_step": -1,
                            "history": []}
    ema = (AveragedModel(_unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(args.ema),
                         use_buffers=True) if args.ema > 0 else None)
    if has_state(state_dir):
        info = load_state(state_dir, model, opts, sampler, ema)
        if rank == 0:
            print(f"resumed from {state_dir} at step {info['step']}", flush=True)
    writer = SummaryWriter(str(args.out / "tb")) if rank == 0 else None
    budget_s = args.minutes * 60 if args.minutes is not None else float("inf")
    max_steps = args.steps if args.steps is not None else 10 ** 9
    meta = {"model": args.model, "preset": args.preset,
            "kwargs": sep_kwargs, "lr_steps": list(args.lr_steps),
            "lr_schedule": args.lr_schedule,
            "data": str(args.data), "command": "python -m training.train " + " ".join(
                sys.argv[1:]), "class_names": names, "n_mix": args.n_mix,
            "n_mix_final": args.n_mix_final, "batch": args.batch,
            "world_size": world, "excluded_classes": excluded,
            "contrastive_weight": args.contrastive_weight,
            "contrastive_temperature": args.contrastive_temperature,
            "motion_e2e": args.motion_e2e, "precision": args.precision,
            "loss_weight": args.loss_weight, "mask_target": args.mask_target, "ema": args.ema}
    guard = PrecisionGuard(info.get("precision", args.precision),  # a resumed run keeps its own
                           skipped=info.get("skipped_steps", 0),
                           fallback_step=info.get("precision_fallback_step"))
    meta["precision"] = guard.precision
    bar = tqdm(total=None if args.steps is None else max_steps, initial=info["step"],
               disable=rank != 0 or args.no_progress, mininterval=5)
    model.train()
    t_start = time.time() - info["elapsed"]
    while True:
        elapsed = time.time() - t_start
        # Every rank stops at the same step: rank 0's clock decides.
        stop = torch.tensor([int(info["step"] >= max_steps or elapsed >= budget_s)])
        if world > 1:
            torch.distributed.broadcast(stop, 0)
        if stop.item():
            break
        progress = max(info["step"] / max_steps, elapsed / budget_s)
        set_lr(opts, base_lrs, progress, args.lr_steps, args.lr_schedule)
        sampler.n_mix = mix_size(progress, args.n_mix, args.n_mix_final, args.lr_steps)
        terms: dict[str, float] = {}
        try:
            loss = train_step(model, opts, sampler, args.batch, n_rows, device,
                              contrastive_weight=args.contrastive_weight,
                              temperature=args.contrastive_temperature, stats=terms,
                              precision=guard.precision, weighting=args.loss_weight,
                              target=args.mask_target)
            guard.passed()
        except NonFiniteStep:
            line = guard.failed(info["step"])  # every rank saw the same all-reduced gradients
            info |= guard.state()
            meta["precision"] = guard.precision
            if rank == 0:
                bar.write(line)
            continue
        info["step"] += 1
        if ema is not None:
            ema.update_parameters(_unwrap(model))
        bar.update(1)
        if writer is not None:
            writer.add_scalar("train/loss", loss.item(), info["step"])
            if args.contrastive_weight > 0:
                writer.add_scalar("train/mask_loss", terms["mask"], info["step"])
                writer.add_scalar("train/contrastive", terms["contrastive"], info["step"])
        last = info["step"] >= max_steps or time.time() - t_start >= budget_s
        if rank == 0 and (info["step"] % args.val_every == 0 or last):
            scored = ema.module if ema is not None else _unwrap(model)
            v = validate(scored, val_batches, n_rows, device)
            info["elapsed"] = time.time() - t_start
            extra = ({"mask_loss": terms["mask"], "contrastive": terms["contrastive"]}
                     if args.contrastive_weight > 0 else {})
            info["history"].append({"step": info["step"], "elapsed": round(info["elapsed"], 1),
                                    "loss": loss.item(), "n_mix": sampler.n_mix} | extra | v)
            for k, val in v.items():
                writer.add_scalar(f"val/{k}", val, info["step"])
            nce = f" contrastive {terms['contrastive']:.4f}" if extra else ""
            bar.write(f"step {info['step']} loss {loss.item():.4f}{nce} val sdr {v['sdr']:.2f} "
                      f"sir {v['sir']:.2f} sar {v['sar']:.2f} ({info['elapsed']:.0f} s)")
            if v["sdr"] > info["best_sdr"]:
                info["best_sdr"], info["best_step"] = v["sdr"], info["step"]
                save_model(args.out / "best", scored, meta | {"step": info["step"], "val": v})
            save_state(state_dir, model, opts, sampler, info, ema)
    bar.close()
    if rank == 0:
        info["elapsed"] = time.time() - t_start
        save_state(state_dir, model, opts, sampler, info, ema)
        (args.out / "summary.json").write_text(json.dumps(
            meta | guard.state() | {k: info[k] for k in ("step", "elapsed", "best_sdr",
                                                         "best_step", "history")},
            indent=1) + "\n")
        print(f"done: {info['step']} steps in {info['elapsed']:.0f} s, best val SDR "
              f"{info['best_sdr']:.2f} dB at step {info['best_step']}", flush=True)
        writer.close()
    if world > 1:
        # Rank 0 validates and writes files after the loop: a rank that tears gloo down
        # first can leave the other waiting forever, so both meet here before shutdown.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
