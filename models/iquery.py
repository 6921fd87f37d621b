"""iQuery (CVPR 2023, "Instruments as Queries"): visually named queries decoded against motion
and audio features by a small mask transformer; each query yields a spectrogram mask.

Stages: encode_visual -> (QueryCache) -> encode_audio -> decode_queries -> predict_masks.
The engine caches encode_visual's output per tracked instrument and runs separate() per hop.
Padding masks are boolean everywhere (True = ignore).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.unet import AudioUNet


@dataclass
class QueryCache:
    """Motion-decoded queries of one mixture, reused across audio steps.

    queries: (B, Q, D); query_pad: (B, Q) bool, True where the slot holds no instrument;
    offsets: (B, Q, n_audio_layers + 1, D) per-layer additions of deep audio prompts, or None
    when the model has none (zero for every other slot).
    """

    queries: Tensor
    query_pad: Tensor
    offsets: Tensor | None = None


class Attention(nn.Module):
    """Multi-head attention with a boolean key padding mask (True = ignore).

    A row whose keys are all padded attends to nothing: its output is exactly zero (so a query
    with no motion tokens is left unchanged by the residual) instead of NaN.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        # A key bias shifts every logit of a row equally, so softmax cancels it: no bias.
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_pad: Tensor | None = None) -> Tensor:
        """query (B, Lq, D), key/value (B, Lk, D), key_pad (B, Lk) bool -> (B, Lq, D)."""
        b, lq, d = query.shape
        lk = key.shape[1]
        h = self.n_heads
        q = self.q_proj(query).view(b, lq, h, d // h).transpose(1, 2)  # (B, H, Lq, Dh)
        k = self.k_proj(key).view(b, lk, h, d // h).transpose(1, 2)
        v = self.v_proj(value).view(b, lk, h, d // h).transpose(1, 2)
        attn_mask = None
        empty = None
        if key_pad is not None:
            assert key_pad.dtype == torch.bool, f"key_pad must be bool, got {key_pad.dtype}"
            empty = key_pad.all(dim=-1, keepdim=True)  # (B, 1)
            # SDPA's boolean mask means True = attend; unmask fully padded rows to avoid NaN
            # and zero their output below.
            attn_mask = (~(key_pad & ~empty))[:, None, None, :]  # (B, 1, 1, Lk)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(b, lq, d))
        if empty is not None:
            out = out.masked_fill(empty[:, :, None], 0.0)
        return out


class CrossAttentionLayer(nn.Module):
    """Post-norm residual cross-attention (Mask2Former layout)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = Attention(d_model, n_heads, dropout)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, memory: Tensor, memory_pos: Tensor | None = None,
                memory_pad: Tensor | None = None) -> Tensor:
        """x (B, L, D), memory (B, M, D), memory_pos (B|1, M, D), memory_pad (B, M) -> (B, L, D).

        The positional encoding is added to the keys only, so values carry content alone."""
        key = memory if memory_pos is None else memory + memory_pos
        return self.norm(x + self.drop(self.attn(x, key, memory, memory_pad)))


class SelfAttentionLayer(nn.Module):
    """Post-norm residual self-attention across the queries of one mixture."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = Attention(d_model, n_heads, dropout)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, pad: Tensor | None = None) -> Tensor:
        """x (B, Q, D), pad (B, Q) bool -> (B, Q, D)."""
        return self.norm(x + self.drop(self.attn(x, x, x, pad)))


class FFNLayer(nn.Module):
    """Post-norm residual two-layer feed-forward block."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_ffn), nn.ReLU(inplace=True),
                                 nn.Dropout(dropout), nn.Linear(d_ffn, d_model))
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., D) -> (..., D)."""
        return self.norm(x + self.drop(self.net(x)))


def sinusoid_1d(length: int, dim: int) -> Tensor:
    """Fixed sinusoidal positions (length, dim)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe


def sinusoid_2d(height: int, width: int, dim: int) -> Tensor:
    """Fixed 2-D positions (height * width, dim), row-major: half the channels encode the
    frequency row, half the time column."""
    half = dim // 2
    rows = sinusoid_1d(height, half)[:, None, :].expand(height, width, half)
    cols = sinusoid_1d(width, half)[None, :, :].expand(height, width, half)
    return torch.cat([rows, cols], dim=-1).reshape(height * width, dim)


class IQuery(nn.Module):
    """The iQuery separator: one pass decodes every instrument of a mixture.

    Query ids 0..n_queries-1 index the learned query table (n_classes of them name the
    vocabulary, the rest are spare slots for jointly trained extra classes); ids from
    n_queries on index audio prompts added later by add_prompts(), kept in their own
    parameters so that fine-tuning them cannot move anything else.
    """

    def __init__(self, *, n_rows: int = 256, n_frames: int = 256, ngf: int = 64,
                 unet_depth: int = 7, token_stride: int = 16, d_model: int = 256,
                 n_heads: int = 8, d_ffn: int = 1024, n_motion_layers: int = 1,
                 n_audio_layers: int = 3, mask_dim: int = 32, n_classes: int = 12,
                 n_queries: int = 16, obj_dim: int = 512, motion_dim: int = 512,
                 dropout: float = 0.1, prompt_sizes: list[int] | tuple[int, ...] = (),
                 deep_prompts: list[bool] | tuple[bool, ...] = ()) -> None:
        super().__init__()
        if n_queries < n_classes:
            raise ValueError(f"n_queries ({n_queries}) must be >= n_classes ({n_classes})")
        if d_model % 4:
            raise ValueError(f"d_model must be divisible by 4 (2-D positions), got {d_model}")
        if deep_prompts and len(deep_prompts) != len(prompt_sizes):
            raise ValueError(f"deep_prompts ({len(deep_prompts)}) must match prompt_sizes "
                             f"({len(prompt_sizes)})")
        self.kwargs = {
            "n_rows": n_rows, "n_frames": n_frames, "ngf": ngf, "unet_depth": unet_depth,
            "token_stride": token_stride, "d_model": d_model, "n_heads": n_heads, "d_ffn": d_ffn,
            "n_motion_layers": n_motion_layers, "n_audio_layers": n_audio_layers,
            "mask_dim": mask_dim, "n_classes": n_classes, "n_queries": n_queries,
            "obj_dim": obj_dim, "motion_dim": motion_dim, "dropout": dropout,
            "prompt_sizes": [int(n) for n in prompt_sizes],
            "deep_prompts": [bool(d) for d in deep_prompts] or [False] * len(prompt_sizes)}
        self.n_rows, self.n_frames = n_rows, n_frames
        self.n_classes, self.n_queries = n_classes, n_queries
        self.d_model, self.mask_dim = d_model, mask_dim
        self.prompt_tuning = False  # set by add_prompts: only prompt rows train

        # Visual naming: class query + projected object feature.
        self.query_embed = nn.Embedding(n_queries, d_model)
        self.prompt_embeds = nn.ParameterList(
            [nn.Parameter(torch.randn(n, d_model) * 0.02) for n in self.kwargs["prompt_sizes"]])
        # Deep prompts (a variant beside the paper's one row): per prompt row, a vector added
        # to its query before each audio-aware layer and before the mask MLP.
        self.prompt_offsets = nn.ParameterList(
            [nn.Parameter(torch.zeros(n, n_audio_layers + 1, d_model))
             for n, deep in zip(self.kwargs["prompt_sizes"], self.kwargs["deep_prompts"],
                                strict=True) if deep])
        self.obj_proj = nn.Linear(obj_dim, d_model)
        self.motion_proj = nn.Linear(motion_dim, d_model)
        self.motion_cross = nn.ModuleList(
            [CrossAttentionLayer(d_model, n_heads, dropout) for _ in range(n_motion_layers)])
        self.motion_ffn = nn.ModuleList(
            [FFNLayer(d_model, d_ffn, dropout) for _ in range(n_motion_layers)])

        self.unet = AudioUNet(in_channels=1, out_channels=mask_dim, ngf=ngf, depth=unet_depth,
                              token_stride=token_stride)
        self.audio_proj = nn.Conv2d(self.unet.token_channels, d_model, 1)
        grid = (n_rows // token_stride, n_frames // token_stride)
        # Not saved: rebuilt from the constructor arguments.
        self.register_buffer("audio_pos", sinusoid_2d(*grid, d_model)[None], persistent=False)

        self.audio_self = nn.ModuleList(
            [SelfAttentionLayer(d_model, n_heads, dropout) for _ in range(n_audio_layers)])
        self.audio_cross = nn.ModuleList(
            [CrossAttentionLayer(d_model, n_heads, dropout) for _ in range(n_audio_layers)])
        self.audio_ffn = nn.ModuleList(
            [FFNLayer(d_model, d_ffn, dropout) for _ in range(n_audio_layers)])
        self.mask_mlp = nn.Sequential(
            nn.Linear(d_model, d_model), nn.ReLU(inplace=True),
            nn.Linear(d_model, d_model), nn.ReLU(inplace=True),
            nn.Linear(d_model, mask_dim))

    # ---------------------------------------------------------------- query table and prompts
    @property
    def n_ids(self) -> int:
        """Number of valid query ids: the query table plus every audio prompt."""
        return self.n_queries + sum(p.shape[0] for p in self.prompt_embeds)

    def query_table(self) -> Tensor:
        """All query embeddings, id order: (n_ids, D)."""
        return torch.cat([self.query_embed.weight, *self.prompt_embeds], dim=0)

    def offset_table(self) -> Tensor | None:
        """Deep prompts' per-layer offsets in id order, (n_ids, n_audio_layers + 1, D), zero
        for every query that is not a deep prompt; None when there is none."""
        if not self.prompt_offsets:
            return None
        shape = (len(self.audio_self) + 1, self.d_model)
        ref = self.query_embed.weight
        parts, deep = [ref.new_zeros(self.n_queries, *shape)], iter(self.prompt_offsets)
        for n, is_deep in zip(self.kwargs["prompt_sizes"], self.kwargs["deep_prompts"],
                              strict=True):
            parts.append(next(deep) if is_deep else ref.new_zeros(n, *shape))
        return torch.cat(parts, dim=0)

    def add_prompts(self, n: int, deep: bool = False) -> list[int]:
        """Add n audio-prompt queries (paper Sec. 3.4) and freeze every other parameter.

        Returns the new query ids. Only the new rows require grad afterwards; they live in their
        own nn.Parameter, so an optimizer built from the trainable parameters cannot touch (or
        weight-decay) any other row. deep=True also gives each row a vector per audio-aware
        layer and one before the mask MLP (zero at first, so training starts from the one-row
        prompt): more of the query side steered, every other class's path still unchanged.
        """
        if n < 1:
            raise ValueError(f"add_prompts needs n >= 1, got {n}")
        first = self.n_ids
        ref = self.query_embed.weight
        # Start from the mean class query: a neutral point that the audio-aware layers know.
        init = ref.detach().mean(0, keepdim=True).expand(n, -1).clone()
        init += torch.randn_like(init) * 0.02
        new = nn.Parameter(init)
        for p in self.parameters():
            p.requires_grad_(False)
        self.prompt_embeds.append(new)
        if deep:
            self.prompt_offsets.append(
                nn.Parameter(init.new_zeros(n, len(self.audio_self) + 1, self.d_model)))
        self.kwargs["prompt_sizes"].append(n)
        self.kwargs["deep_prompts"].append(bool(deep))
        self.prompt_tuning = True
        self.train(self.training)
        return list(range(first, first + n))

    def train(self, mode: bool = True) -> IQuery:
        """As nn.Module.train, but while only prompts train (after add_prompts) the batch norms
        stay in eval mode: their running statistics are state of the frozen network too."""
        super().train(mode)
        if getattr(self, "prompt_tuning", False):
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # ---------------------------------------------------------------------------- stages
    def encode_visual(self, obj_feats: Tensor, class_ids: Tensor, motion: Tensor,
                      motion_pad: Tensor, query_pad: Tensor) -> QueryCache:
        """Visually named, motion-decoded queries.

        obj_feats (B, Q, obj_dim), class_ids (B, Q) long, motion (B, Q, Tm, motion_dim),
        motion_pad (B, Q, Tm) bool, query_pad (B, Q) bool -> QueryCache(queries (B, Q, D)).
        """
        b, q = class_ids.shape
        tm = motion.shape[2]
        if motion_pad.dtype != torch.bool or query_pad.dtype != torch.bool:
            # A float mask would be added to the attention logits instead of masking.
            raise TypeError(f"padding masks must be torch.bool (True = ignore), got "
                            f"motion_pad {motion_pad.dtype}, query_pad {query_pad.dtype}")
        assert motion.shape[:3] == motion_pad.shape == (b, q, tm), (
            f"motion {tuple(motion.shape)} / motion_pad {tuple(motion_pad.shape)} "
            f"do not match class_ids {tuple(class_ids.shape)}")
        # Padded slots may hold any id; read a valid row for them, their output is ignored.
        ids = class_ids.masked_fill(query_pad, 0)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_ids):
            raise ValueError(f"class ids must be in [0, {self.n_ids}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        queries = F.embedding(ids, self.query_table()) + self.obj_proj(obj_feats)  # (B, Q, D)
        table = self.offset_table()
        offsets = None if table is None else table[ids]  # (B, Q, L + 1, D)
        if len(self.motion_cross) == 0:  # the no-motion ablation
            return QueryCache(queries=queries, query_pad=query_pad, offsets=offsets)
        # Each query attends to its own track only: fold the slots into the batch.
        x = queries.reshape(b * q, 1, self.d_model)
        mem = self.motion_proj(motion).reshape(b * q, tm, self.d_model)
        pos = sinusoid_1d(tm, self.d_model).to(mem)[None]
        pad = motion_pad.reshape(b * q, tm)
        for cross, ffn in zip(self.motion_cross, self.motion_ffn, strict=True):
            x = ffn(cross(x, mem, pos, pad))
        return QueryCache(queries=x.reshape(b, q, self.d_model), query_pad=query_pad,
                          offsets=offsets)

    def encode_audio(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, 1, F, T) log-magnitude window -> (audio tokens (B, N_A, D) with positions
        added, top (B, 2 ngf, F / 2, T / 2): the input of the U-Net's outer layer, from which
        predict_masks reads the mask_dim-channel audio embedding)."""
        assert x.shape[1:] == (1, self.n_rows, self.n_frames), (
            f"expected input (B, 1, {self.n_rows}, {self.n_frames}), got {tuple(x.shape)}")
        top, feat = self.unet(x)
        tokens = self.audio_proj(feat).flatten(2).transpose(1, 2)  # (B, N_A, D)
        return tokens + self.audio_pos, top

    def decode_queries(self, queries: Tensor, query_pad: Tensor, audio_tokens: Tensor,
                       offsets: Tensor | None = None) -> Tensor:
        """Audio-aware layers: queries (B, Q, D), query_pad (B, Q) bool,
        audio_tokens (B, N_A, D), deep prompts' offsets (B, Q, L + 1, D) or None -> (B, Q, D)."""
        x = queries
        for i, (self_attn, cross, ffn) in enumerate(
                zip(self.audio_self, self.audio_cross, self.audio_ffn, strict=True)):
            if offsets is not None:
                x = x + offsets[:, :, i]
            x = ffn(cross(self_attn(x, query_pad), audio_tokens))
        return x if offsets is None else x + offsets[:, :, -1]

    def predict_masks(self, q: Tensor, top: Tensor) -> Tensor:
        """q (B, Q, D), top from encode_audio -> masks (B, Q, F, T) in [0, 1]: the sigmoid of
        each query's mask embedding dotted with the audio embedding at every bin."""
        mask_emb = self.mask_mlp(q)  # (B, Q, mask_dim)
        return torch.sigmoid(self.unet.mix(top, mask_emb))

    def separate(self, x: Tensor, cache: QueryCache) -> Tensor:
        """Per audio step: x (B, 1, F, T) + cached queries -> masks (B, Q, F, T), warped domain.

        Masks of padded query slots are zero."""
        tokens, top = self.encode_audio(x)
        q = self.decode_queries(cache.queries, cache.query_pad, tokens, cache.offsets)
        masks = self.predict_masks(q, top)
        return masks.masked_fill(cache.query_pad[:, :, None, None], 0.0)

    def forward_with_embeddings(self, x: Tensor, obj_feats: Tensor, class_ids: Tensor,
                                motion: Tensor, motion_pad: Tensor, query_pad: Tensor
                                ) -> tuple[Tensor, Tensor, Tensor]:
        """As forward, plus each query before and after the audio-aware layers (for the
        auxiliary contrastive loss of the paper's Table 6).

        Same inputs as forward -> (masks (B, Q, F, T), identical to forward's; visual_q
        (B, Q, D), encode_visual's queries; audio_q (B, Q, D), decode_queries' output).
        Embeddings of padded slots (query_pad True) are not zeroed: callers must drop them."""
        cache = self.encode_visual(obj_feats, class_ids, motion, motion_pad, query_pad)
        tokens, top = self.encode_audio(x)
        audio_q = self.decode_queries(cache.queries, cache.query_pad, tokens, cache.offsets)
        masks = self.predict_masks(audio_q, top).masked_fill(
            cache.query_pad[:, :, None, None], 0.0)
        return masks, cache.queries, audio_q

    def forward(self, x: Tensor, obj_feats: Tensor, class_ids: Tensor, motion: Tensor,
                motion_pad: Tensor, query_pad: Tensor, return_embeddings: bool = False
                ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """x (B, 1, F, T), obj_feats (B, Q, obj_dim), class_ids (B, Q), motion (B, Q, Tm, Dm),
        motion_pad (B, Q, Tm) bool, query_pad (B, Q) bool -> masks (B, Q, F, T).

        return_embeddings=True returns forward_with_embeddings' triple instead; it exists so
        that a DistributedDataParallel wrapper, which syncs gradients only for work done
        through its forward, can reach the embeddings too."""
        if return_embeddings:
            return self.forward_with_embeddings(x, obj_feats, class_ids, motion, motion_pad,
                                                query_pad)
        cache = self.encode_visual(obj_feats, class_ids, motion, motion_pad, query_pad)
        return self.separate(x, cache)
