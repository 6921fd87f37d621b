"""SynthMUSIC pictures: emoji players on varied backgrounds, moving with their music.

Every instrument glyph (Noto Color Emoji, which only rasterises at size 109) is held by a player
(a face emoji over a torso). What an instrument does on screen follows its own part: bowing,
strumming, lifting a horn, striking a drum, squeezing bellows, all driven by the note onsets and
the audio envelope, so that motion tells when an instrument sounds; a silent one only breathes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

DEB_FONT = "fonts-noto-color-emoji"
DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
GLYPH_SIZE = 109  # the only size at which the CBDT bitmaps of Noto Color Emoji render

# Faces of the players: adults, neutral / women / men / beards / older, in skin-tone variants.
_FACES = ["\U0001F9D1", "\U0001F469", "\U0001F468", "\U0001F9D4", "\U0001F9D3", "\U0001F471"]
_TONES = ["", "\U0001F3FB", "\U0001F3FC", "\U0001F3FD", "\U0001F3FE", "\U0001F3FF"]
PLAYER_FACES = [f + t for f in _FACES for t in _TONES]

# How each class moves when it sounds (classes not listed bob with the envelope).
MOTION_STYLE = {
    "violin": "bow",
    "acoustic_guitar": "strum",
    "banjo": "strum",
    "flute": "wind",
    "horn": "wind",
    "saxophone": "wind",
    "trumpet": "wind",
    "piano": "keys",
    "accordion": "bellows",
    "drum": "hit",
    "congas": "hit",
    "maracas": "shake",
}


class EmojiArt:
    """Rasterised glyphs, cropped to their opaque pixels, cached per string."""

    def __init__(self, font_path: str | Path = DEFAULT_FONT):
        font_path = Path(font_path)
        if not font_path.is_file():
            raise FileNotFoundError(
                f"emoji font not found: {font_path}; install the Debian package {DEB_FONT} "
                "(apt-get install fonts-noto-color-emoji) or pass --font FILE.ttf"
            )
        self.font = ImageFont.truetype(str(font_path), GLYPH_SIZE)
        self._cache: dict[str, Image.Image] = {}

    def glyph(self, text: str) -> Image.Image:
        if text not in self._cache:
            im = Image.new("RGBA", (GLYPH_SIZE * 2, GLYPH_SIZE * 2), (0, 0, 0, 0))
            ImageDraw.Draw(im).text((8, 8), text, font=self.font, embedded_color=True)
            box = im.getchannel("A").getbbox()
            if box is None:
                raise ValueError(f"the emoji font has no glyph for {text!r}")
            self._cache[text] = im.crop(box)
        return self._cache[text]

    def scaled(self, text: str, height: int) -> Image.Image:
        g = self.glyph(text)
        width = max(1, round(g.width * height / g.height))
        return g.resize((width, height), Image.LANCZOS)


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random scene backdrop (H, W, 3) uint8: gradient, wall + floor, stripes or noise texture,
    with a soft light spot."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c1, c2 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    kind = rng.integers(4)
    if kind == 0:  # linear gradient at a random angle
        a = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(a) + yy * math.sin(a)) / (height + width) + 0.5
    elif kind == 1:  # wall and floor, the horizon somewhere in the lower half
        horizon = rng.uniform(0.45, 0.8) * height
        t = np.clip((yy - horizon) / 6.0 + 0.5, 0, 1)
    elif kind == 2:  # stripes (curtains, panelling)
        period = rng.uniform(8, 40)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (xx if rng.random() < 0.7 else yy) / period)
        t = 0.35 + 0.3 * t
    else:  # smooth noise texture
        coarse = rng.random((height // 16 + 2, width // 16 + 2)).astype(np.float32)
        t = np.asarray(
            Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height),
                                                                     Image.BICUBIC),
            np.float32,
        ) / 255.0
    t = np.clip(t, 0, 1)[..., None]
    img = c1 * (1 - t) + c2 * t
    img += rng.normal(0, rng.uniform(1, 8), (height, width, 1))  # grain
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    r2 = ((yy - cy) ** 2 + (xx - cx) ** 2)[..., None]
    img += rng.uniform(0, 60) * np.exp(-r2 / (2 * rng.uniform(30, 90) ** 2))  # light
    img = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:  # a defocused backdrop (depth of field)
        img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2))))
    return img


def activity(events: list[tuple[int, float, float, int]], audio: np.ndarray, sample_rate: int,
             fps: float, n_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame drivers of motion, frame k (0-based) at time k / fps.

    Returns (envelope in [0, 1], onset pulse in [0, 1], note parity +-1), each (n_frames,).
    """
    times = np.arange(n_frames) / fps
    half = int(sample_rate / fps / 2)
    centres = (times * sample_rate).astype(int)
    env = np.array([
        np.sqrt(np.mean(audio[max(0, c - half): c + half] ** 2)) if c < len(audio) else 0.0
        for c in centres
    ])
    ref = np.percentile(env, 95) if env.max() > 0 else 1.0
    env = np.clip(env / max(ref, 1e-9), 0, 1)
    env[env < 0.05] = 0.0  # release tails and noise do not count as playing
    onsets = np.array(sorted(e[1] for e in events)) if events else np.zeros(0)
    pulse = np.zeros(n_frames)
    parity = np.ones(n_frames)
    for k, t in enumerate(times):
        past = onsets[onsets <= t]
        if len(past):
            pulse[k] = min(1.0, float(np.sum(np.exp(-(t - past[-4:]) / 0.12))))
            parity[k] = 1.0 if len(past) % 2 else -1.0
    return env, pulse, parity


@dataclass
class Pose:
    """Per-frame offsets of one player: instrument (dx, dy, angle deg, x-scale), head dy."""

    dx: np.ndarray
    dy: np.ndarray
    angle: np.ndarray
    sx: np.ndarray
    head_dy: np.ndarray


def pose_curves(style: str, env: np.ndarray, pulse: np.ndarray, parity: np.ndarray,
                fps: float, rng: np.random.Generator, amp: float) -> Pose:
    """Motion of a player of `style` from its drivers; `amp` scales offsets to the sprite size.

    A silent part (env = pulse = 0) only breathes: a slow sway of about a pixel.
    """
    n = len(env)
    t = np.arange(n) / fps
    breath = np.sin(2 * math.pi * rng.uniform(0.15, 0.35) * t + rng.uniform(0, 2 * math.pi))
    dx, dy = np.zeros(n), 0.6 * breath * amp * 0.1
    angle, sx = np.zeros(n), np.ones(n)
    if style == "bow":  # bowing: tilt flips direction with each note, deeper when louder
        angle = 9.0 * env * parity
        dx = 0.12 * amp * env * parity
    elif style == "strum":
        angle = -10.0 * pulse
        dy = dy + 0.08 * amp * pulse
    elif style == "wind":  # the horn lifts while blown and nods with each tongued note
        dy = dy - 0.14 * amp * env + 0.07 * amp * pulse
        angle = -6.0 * env + 4.0 * pulse * parity
    elif style == "keys":
        dy = dy + 0.08 * amp * pulse
        dx = 0.05 * amp * env * parity
    elif style == "bellows":  # squeeze and pull while sounding
        phase = np.cumsum(env) * 2 * math.pi * 0.6 / fps
        sx = 1.0 - 0.18 * env * (0.5 + 0.5 * np.sin(phase))
        dy = dy + 0.05 * amp * pulse
    elif style == "hit":
        dy = dy + 0.12 * amp * pulse
        angle = 4.0 * pulse * parity
    elif style == "shake":
        angle = 18.0 * pulse * parity
        dy = dy - 0.06 * amp * pulse
    else:
        dy = dy - 0.1 * amp * env
    head_dy = 0.5 * breath * amp * 0.06 - 0.06 * amp * np.maximum(env, pulse)
    return Pose(dx, dy, angle, sx, head_dy)


@dataclass
class Figure:
    """One instrument on screen, possibly held by a player, and its motion over the clip."""

    class_id: int
    sprite: Image.Image  # instrument, already scaled
    cx: float  # instrument centre at rest, in frame pixels
    cy: float
    pose: Pose
    face: Image.Image | None = None  # scaled face glyph of the player; None: no player
    torso_rgb: tuple[int, int, int] = (80, 80, 160)
    _cache: dict = field(default_factory=dict)

    def instrument_at(self, k: int) -> tuple[Image.Image, tuple[int, int, int, int]]:
        """The transformed sprite of frame k and its opaque box (x1, y1, x2, y2) in the sprite."""
        key = (round(float(self.pose.angle[k]) * 2) / 2, round(float(self.pose.sx[k]), 2))
        if key not in self._cache:
            im = self.sprite
            if key[1] != 1.0:
                im = im.resize((max(1, round(im.width * key[1])), im.height), Image.BILINEAR)
            if key[0] != 0.0:
                im = im.rotate(key[0], resample=Image.BICUBIC, expand=True)
            self._cache[key] = (im, im.getchannel("A").getbbox() or (0, 0, 1, 1))
        return self._cache[key]


def make_figure(art: EmojiArt, class_id: int, emoji: str, style: str, cx: float, cy: float,
                size: int, env: np.ndarray, pulse: np.ndarray, parity: np.ndarray, fps: float,
                rng: np.random.Generator, with_player: bool = True) -> Figure:
    """A figure whose instrument is `size` px tall, centred at (cx, cy) at rest."""
    sprite = art.scaled(emoji, size)
    if rng.random() < 0.5:
        sprite = sprite.transpose(Image.FLIP_LEFT_RIGHT)
    pose = pose_curves(style, env, pulse, parity, fps, rng, amp=size)
    face = None
    if with_player:
        face = art.scaled(PLAYER_FACES[rng.integers(len(PLAYER_FACES))],
                          round(size * rng.uniform(0.7, 0.85)))
    torso = tuple(int(c) for c in rng.integers(30, 230, 3))
    return Figure(class_id, sprite, cx, cy, pose, face, torso)


def draw_frame(bg: np.ndarray, margin: int, shake: tuple[int, int], figures: list[Figure],
               k: int, brightness: float = 1.0) -> tuple[np.ndarray, list[list[float]]]:
    """Compose frame k: backdrop seen through a shaken camera, then each figure.

    bg: (H + 2 margin, W + 2 margin, 3) uint8. Returns the frame (H, W, 3) uint8 and one row
    [class_id, x1, y1, x2, y2] (pixels, clipped to the frame) per visible instrument.
    """
    sx, sy = shake
    full_h, full_w = bg.shape[:2]
    h, w = full_h - 2 * margin, full_w - 2 * margin
    frame = Image.fromarray(bg[margin - sy: margin - sy + h, margin - sx: margin - sx + w])
    draw = ImageDraw.Draw(frame)
    boxes = []
    for fig in figures:
        size = fig.sprite.height
        cx = fig.cx + fig.pose.dx[k] + sx
        cy = fig.cy + fig.pose.dy[k] + sy
        if fig.face is not None:
            # body stands behind the instrument: the face sits above, the torso beneath it
            fx = fig.cx + sx - fig.face.width / 2
            fy = fig.cy + sy - size * 0.55 - fig.face.height + fig.pose.head_dy[k]
            tw = fig.face.width * 0.62
            draw.rounded_rectangle(
                (fx + fig.face.width / 2 - tw, fy + fig.face.height * 0.85,
                 fx + fig.face.width / 2 + tw, fig.cy + sy + size * 0.7),
                radius=max(2, int(tw / 2)), fill=fig.torso_rgb,
            )
            frame.paste(fig.face, (round(fx), round(fy)), fig.face)
        im, box = fig.instrument_at(k)
        x0, y0 = round(cx - im.width / 2), round(cy - im.height / 2)
        frame.paste(im, (x0, y0), im)
        x1, y1 = max(0, x0 + box[0]), max(0, y0 + box[1])
        x2, y2 = min(w, x0 + box[2]), min(h, y0 + box[3])
        if x2 > x1 and y2 > y1:
            boxes.append([fig.class_id, x1, y1, x2, y2])
    out = np.asarray(frame)
    if brightness != 1.0:
        out = np.clip(out.astype(np.float32) * brightness, 0, 255).astype(np.uint8)
    return out, boxes


def camera_shake(rng: np.random.Generator, n_frames: int, margin: int) -> np.ndarray:
    """(n_frames, 2) integer offsets: a bounded, smoothed random walk (a hand-held camera)."""
    amp = rng.uniform(0.0, margin)
    walk = np.cumsum(rng.normal(0, 1, (n_frames, 2)), axis=0)
    walk -= walk.mean(axis=0)
    scale = np.abs(walk).max() or 1.0
    return np.round(walk / scale * amp).astype(int)

