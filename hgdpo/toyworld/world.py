"""The toy world: a prompt grammar, a renderer of simple human figures at 32 px, and malformations.

A scene is a figure (head, torso, two arms and two legs, each limb two segments joined at the elbow or
knee) in a shirt colour, a pose and a background. :func:`render` draws it deterministically (4x
supersampled, then reduced to 32 px); :func:`malform` draws the failures the paper's Figure 2 shows
in real models: a missing, extra or broken limb, the wrong pose, the wrong colour, a melted figure.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 32  # output pixels
_SUPER = 4  # supersampling factor

SUBJECTS = ("person", "man", "woman")
COLOURS = {
    "red": (205, 35, 35),
    "blue": (35, 65, 205),
    "green": (35, 150, 50),
    "yellow": (240, 210, 40),
    "purple": (135, 45, 165),
}
POSES = {  # phrase, then (upper, fore) angles in degrees for the image-left and image-right arm; 0 = down
    "arms_down": ("with arms down", ((28, 12), (-28, -12))),
    "one_arm_up": ("raising one arm", ((15, 8), (-150, -175))),
    "both_arms_up": ("raising both arms", ((150, 175), (-150, -175))),
    "arms_out": ("with arms out", ((90, 90), (-90, -90))),
}
BACKGROUNDS = {  # phrase, sky colour, ground colour, horizon row (in output pixels)
    "beach": ("on a beach", (140, 200, 240), (235, 215, 160), 21),
    "grass": ("on the grass", (160, 205, 235), (70, 160, 60), 20),
    "indoor": ("in a room", (170, 190, 200), (140, 95, 60), 22),
    "night": ("at night", (20, 22, 48), (50, 50, 62), 21),
}
SKIN = (232, 190, 150)
TROUSERS = (45, 60, 135)
LIMBS = ("left_arm", "right_arm", "left_leg", "right_leg")
MALFORMATIONS = ("missing_limb", "extra_limb", "broken_limb", "wrong_pose", "wrong_colour", "melted")

# figure geometry in output pixels, relative to the figure's anchor (centre x, head-top y)
HEAD_Y, HEAD_R = 3.0, 2.7
TORSO = (-3.0, 6.0, 3.0, 15.0)  # left, top, right, bottom
SHOULDER_Y, HIP_Y, HIP_X = 7.0, 15.0, 1.6
ARM = (4.5, 4.0, 2.0)  # upper length, fore length, width
LEG = (5.6, 5.4, 2.4)
LEG_ANGLES = ((8, 4), (-8, -4))
ANCHOR = (16.0, 4.0)  # anchor of an unshifted figure
JITTER = (3.0, 1.0)  # the largest shift in x and y


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for."""

    subject: str
    colour: str
    pose: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.subject} in a {self.colour} shirt {POSES[self.pose][0]} {BACKGROUNDS[self.background][0]}"


def all_scenes() -> list[Scene]:
    """Every scene of the grammar, in a fixed order (3 subjects x 5 colours x 4 poses x 4 backgrounds)."""
    return [Scene(s, c, p, b) for s in SUBJECTS for c in COLOURS for p in POSES for b in BACKGROUNDS]


def all_prompts() -> list[str]:
    return [scene.prompt for scene in all_scenes()]


_BY_PROMPT = {scene.prompt: scene for scene in all_scenes()}


def parse_prompt(prompt: str) -> Scene:
    """The scene a prompt of the grammar describes; a clear error for any other prompt."""
    scene = _BY_PROMPT.get(" ".join(prompt.lower().split()))
    if scene is None:
        raise ValueError(f"Prompt {prompt!r} is not in the toy world's grammar: write e.g. {all_prompts()[0]!r} "
                         "(hgdpo.toyworld.world.all_prompts() lists them all).")
    return scene


@dataclass(frozen=True)
class Segment:
    """One straight part of a limb: from ``start`` to ``end`` (output pixels), ``width`` thick."""

    start: tuple[float, float]
    end: tuple[float, float]
    width: float


@dataclass(frozen=True)
class Figure:
    """A drawable figure: its anchor, shirt colour and the two segments of each named limb."""

    anchor: tuple[float, float]
    shirt: tuple[int, int, int]
    limbs: tuple[tuple[str, tuple[Segment, Segment]], ...]
    melted: bool = False
    melt_seed: int = 0


def _chain(origin: tuple[float, float], angles: tuple[float, float], lengths: tuple[float, float, float]
           ) -> tuple[Segment, Segment]:
    """Two segments from ``origin``: angles in degrees from straight down, positive towards image-left."""
    points = [origin]
    for angle, length in zip(angles, lengths[:2]):
        x, y = points[-1]
        radians = math.radians(angle)
        points.append((x - length * math.sin(radians), y + length * math.cos(radians)))
    return Segment(points[0], points[1], lengths[2]), Segment(points[1], points[2], lengths[2])


def pose_limbs(pose: str, anchor: tuple[float, float]) -> tuple[tuple[str, tuple[Segment, Segment]], ...]:
    """The four limbs of a figure in ``pose`` whose anchor is ``anchor``."""
    ax, ay = anchor
    (left_arm, right_arm) = POSES[pose][1]
    shoulders = ((ax + TORSO[0] + 0.6, ay + SHOULDER_Y), (ax + TORSO[2] - 0.6, ay + SHOULDER_Y))
    hips = ((ax - HIP_X, ay + HIP_Y), (ax + HIP_X, ay + HIP_Y))
    return (
        ("left_arm", _chain(shoulders[0], left_arm, ARM)),
        ("right_arm", _chain(shoulders[1], right_arm, ARM)),
        ("left_leg", _chain(hips[0], LEG_ANGLES[0], LEG)),
        ("right_leg", _chain(hips[1], LEG_ANGLES[1], LEG)),
    )


def figure_for(scene: Scene, shift: tuple[float, float] = (0.0, 0.0)) -> Figure:
    """The correct figure for ``scene``, its anchor moved by ``shift``."""
    anchor = (ANCHOR[0] + shift[0], ANCHOR[1] + shift[1])
    return Figure(anchor, COLOURS[scene.colour], pose_limbs(scene.pose, anchor))


def background_image(background: str) -> Image.Image:
    """The background alone, at output size."""
    _, sky, ground, horizon = BACKGROUNDS[background]
    pixels = np.empty((SIZE, SIZE, 3), np.uint8)
    pixels[:horizon], pixels[horizon:] = sky, ground
    if background == "beach":  # a strip of sea above the sand
        pixels[horizon - 3 : horizon] = (40, 110, 190)
    return Image.fromarray(pixels)


def _scaled(point: tuple[float, float]) -> tuple[float, float]:
    return point[0] * _SUPER, point[1] * _SUPER


def _draw_segment(draw: ImageDraw.ImageDraw, segment: Segment, colour) -> None:
    width = segment.width * _SUPER
    draw.line([_scaled(segment.start), _scaled(segment.end)], fill=colour, width=round(width))
    for point in (segment.start, segment.end):  # round joints
        x, y = _scaled(point)
        draw.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=colour)


def figure_layer(figure: Figure) -> tuple[Image.Image, Image.Image]:
    """The figure alone at output size: its RGB colours and its coverage mask (L)."""
    big = SIZE * _SUPER
    colour = Image.new("RGB", (big, big))
    mask = Image.new("L", (big, big))
    for target, fill in ((colour, None), (mask, 255)):
        draw = ImageDraw.Draw(target)
        ax, ay = figure.anchor
        for name, segments in figure.limbs:
            part = fill if fill is not None else (TROUSERS if "leg" in name else figure.shirt)
            for segment in segments:
                _draw_segment(draw, segment, part)
        left, top, right, bottom = TORSO
        draw.rectangle([*_scaled((ax + left, ay + top)), *_scaled((ax + right, ay + bottom))],
                       fill=fill if fill is not None else figure.shirt)
        hx, hy = _scaled((ax, ay + HEAD_Y))
        radius = HEAD_R * _SUPER
        draw.ellipse([hx - radius, hy - radius, hx + radius, hy + radius], fill=fill if fill is not None else SKIN)
    small = (SIZE, SIZE)
    return colour.resize(small, Image.Resampling.BOX), mask.resize(small, Image.Resampling.BOX)


def _melt(colour: Image.Image, mask: Image.Image, seed: int) -> tuple[Image.Image, Image.Image]:
    """Smear the figure downwards column by column and blur it: a 'melted' figure."""
    rng = np.random.default_rng(seed)
    rgb, alpha = np.asarray(colour, np.float32), np.asarray(mask, np.float32)
    phase, amplitude = rng.uniform(0, 2 * np.pi), rng.uniform(2.0, 4.0)
    for x in range(SIZE):
        shift = int(round(amplitude * (1 + math.sin(phase + x / 2.5))))
        rgb[:, x], alpha[:, x] = np.roll(rgb[:, x], shift, axis=0), np.roll(alpha[:, x], shift, axis=0)
    blur = ImageFilter.GaussianBlur(1.1)
    smeared = Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).filter(blur)
    return smeared, Image.fromarray(alpha.clip(0, 255).astype(np.uint8)).filter(blur)


def compose(figure: Figure, background: str) -> Image.Image:
    """``figure`` drawn over ``background``."""
    colour, mask = figure_layer(figure)
    if figure.melted:
        colour, mask = _melt(colour, mask, figure.melt_seed)
    base = np.asarray(background_image(background), np.float32)
    alpha = np.asarray(mask, np.float32)[..., None] / 255.0
    rgb = np.asarray(colour, np.float32)
    # the layer's colours are premultiplied by the coverage (drawn over black), so add them
    pixels = base * (1.0 - alpha) + rgb
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))


def random_shift(rng: random.Random) -> tuple[float, float]:
    return rng.uniform(-JITTER[0], JITTER[0]), rng.uniform(-JITTER[1], JITTER[1])


def render(scene: Scene, seed: int = 0) -> Image.Image:
    """A correct image of ``scene``; the seed only moves the figure a little."""
    return compose(figure_for(scene, random_shift(random.Random(seed))), scene.background)


# --------------------------------------------------------------------------- malformations


def _other(options, current, rng: random.Random):
    return rng.choice([option for option in options if option != current])


def _broken(segments: tuple[Segment, Segment], rng: random.Random) -> tuple[Segment, Segment]:
    """The lower segment detached from the joint and turned."""
    upper, lower = segments
    dx, dy = rng.choice((-1, 1)) * rng.uniform(3.0, 4.5), rng.uniform(1.5, 3.0)
    start = (lower.start[0] + dx, lower.start[1] + dy)
    angle = math.atan2(lower.end[1] - lower.start[1], lower.end[0] - lower.start[0]) + rng.choice((-1, 1)) * 1.6
    length = math.dist(lower.start, lower.end)
    end = (start[0] + length * math.cos(angle), start[1] + length * math.sin(angle))
    return upper, Segment(start, end, lower.width)


def _extra(figure: Figure, pose: str, rng: random.Random) -> tuple[str, tuple[Segment, Segment]]:
    """A third arm (from a shoulder, away from the real arms) or a third leg (from the hips, splayed)."""
    ax, ay = figure.anchor
    if rng.random() < 0.5:
        arms = [upper for upper, _ in POSES[pose][1]]
        angle = rng.choice([a for a in (55, 100, 145, -55, -100, -145) if all(abs(a - arm) > 40 for arm in arms)])
        shoulder_x = TORSO[0] + 0.6 if angle > 0 else TORSO[2] - 0.6
        origin, lengths = (ax + shoulder_x, ay + SHOULDER_Y), ARM
    else:
        angle = rng.choice((45, -45))
        origin, lengths = (ax, ay + HIP_Y), LEG
    return "extra", _chain(origin, (angle, angle + rng.uniform(-20, 20)), lengths)


_SWAPS = ("wrong_pose", "wrong_colour")


def drawn_scene(scene: Scene, kind: str | None, seed: int = 0) -> Scene:
    """The scene :func:`malform` actually draws: another pose or colour for those two kinds, else ``scene``."""
    if kind not in _SWAPS:
        return scene
    rng = random.Random(f"{seed}:{kind}")
    if kind == "wrong_pose":
        return replace(scene, pose=_other(POSES, scene.pose, rng))
    return replace(scene, colour=_other(COLOURS, scene.colour, rng))


def malform(scene: Scene, kind: str, seed: int = 0) -> Image.Image:
    """An image of ``scene`` with one failure of ``kind`` (one of :data:`MALFORMATIONS`)."""
    if kind not in MALFORMATIONS:
        raise ValueError(f"Unknown malformation {kind!r}: use one of {', '.join(MALFORMATIONS)}.")
    if kind in _SWAPS:
        return render(drawn_scene(scene, kind, seed), seed)
    rng = random.Random(f"{seed}:{kind}")
    figure = figure_for(scene, random_shift(rng))
    limbs = list(figure.limbs)
    if kind == "missing_limb":
        del limbs[rng.randrange(len(limbs))]
    elif kind == "broken_limb":
        index = rng.randrange(len(limbs))
        limbs[index] = (limbs[index][0], _broken(limbs[index][1], rng))
    elif kind == "extra_limb":
        limbs.append(_extra(figure, scene.pose, rng))
    figure = replace(figure, limbs=tuple(limbs), melted=kind == "melted", melt_seed=rng.randrange(2**31))
    return compose(figure, scene.background)


@dataclass(frozen=True)
class Example:
    """One training image: the prompt's scene, the malformation drawn (None: correct) and the image."""

    scene: Scene
    kind: str | None
    seed: int
    image: Image.Image

    @property
    def drawn(self) -> Scene:
        return drawn_scene(self.scene, self.kind, self.seed)


def training_examples(seed: int, malformed_share: float, kinds: tuple[str, ...] = MALFORMATIONS
                      ) -> Iterator[Example]:
    """An endless, seeded stream of examples; a share ``malformed_share`` has one of ``kinds``."""
    rng = random.Random(seed)
    scenes = all_scenes()
    while True:
        scene = rng.choice(scenes)
        image_seed = rng.randrange(2**31)
        if rng.random() < malformed_share:
            kind = rng.choice(kinds)
            yield Example(scene, kind, image_seed, malform(scene, kind, image_seed))
        else:
            yield Example(scene, None, image_seed, render(scene, image_seed))
