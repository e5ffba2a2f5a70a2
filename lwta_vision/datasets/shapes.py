"""Generated shapes-on-textures images with pixel-exact concept masks, for measuring dissection (torch only).

Real probe sets (Broden, ImageNet) only approximate the truth about which concept is where; here every
pixel's shape, colour and texture is known, so a dissection method's answers can be scored exactly.
Nothing is read from disk: sample ``i`` is a pure function of ``(seed, split, i)``, so any worker, any
order and any machine produce the same images.

Each image is 1-3 shapes drawn over a background texture. The class is the shape of the largest object
by visible area (after occlusion), and the largest is always at least 1.3x the area of every other
object, so the label is unambiguous.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan")
TEXTURES = ("plain", "stripes", "dots", "checkerboard")

# Saturated and far apart in RGB, so colour is never ambiguous to a network or a reader.
_PALETTE = np.array([
    (230, 25, 25),    # red
    (30, 170, 40),    # green
    (30, 60, 230),    # blue
    (245, 225, 20),   # yellow
    (245, 130, 15),   # orange
    (135, 30, 185),   # purple
    (250, 125, 195),  # pink
    (20, 215, 225),   # cyan
    (48, 48, 48),     # dark grey base (not a concept)
    (176, 176, 176),  # light grey base (not a concept)
], dtype=np.uint8)
_BASES = (len(COLOURS), len(COLOURS) + 1)

CONCEPT_NAMES: tuple[str, ...] = SHAPES + COLOURS + TEXTURES
CONCEPT_CATEGORIES: tuple[str, ...] = (("shape",) * len(SHAPES) + ("colour",) * len(COLOURS)
                                       + ("texture",) * len(TEXTURES))

# Area of each shape per unit of its size parameter squared, so objects can be sized by area: the class
# is decided by area, and a triangle and a square of the same "radius" differ in area by 3x.
_RING_INNER = 0.55
_STAR_INNER = 0.5
_CROSS_HALF_WIDTH = 0.35
_AREA_FACTOR = {
    "circle": math.pi,
    "square": 4.0,  # size = half side
    "triangle": 3 * math.sqrt(3) / 4,  # size = circumradius
    "star": 5 * _STAR_INNER * math.sin(math.pi / 5),  # size = outer radius
    "cross": 8 * _CROSS_HALF_WIDTH - 4 * _CROSS_HALF_WIDTH ** 2,  # size = half arm length
    "ring": math.pi * (1 - _RING_INNER ** 2),  # size = outer radius
}
# Radius of the bounding circle per unit size, to keep every object inside the frame at any rotation.
_EXTENT = {"circle": 1.0, "square": math.sqrt(2), "triangle": 1.0, "star": 1.0,
           "cross": math.hypot(1.0, _CROSS_HALF_WIDTH), "ring": 1.0}

# Areas in pixels at 64x64, scaled by (image_size / 64)^2. Largest object: circle radius 11-15.5 px,
# triangle circumradius 17.5-24 px; others at most 1/1.7 of the largest's area.
_BIG_AREA = (400.0, 750.0)
_SMALL_AREA_MIN = 140.0
_SMALL_AREA_MAX_RATIO = 1 / 1.7
_MIN_AREA_RATIO = 1.3  # largest visible area / any other visible area
_MIN_VISIBLE = 0.4  # every object keeps this fraction of its own pixels after occlusion
_MAX_TRIES = 20
# Independent random streams per split. "clip" is where the concept CLIP (lwta_vision.concept_clip) trains:
# a stream of its own, so for every seed it never sees an image of the splits a network trains or probes on.
_STREAMS = {"train": 0, "val": 1, "test": 2, "clip": 3}


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(xx, yy)``, computed once per image size."""
    c = np.arange(size, dtype=np.float32) + 0.5
    xx, yy = np.meshgrid(c, c)
    xx.setflags(write=False)
    yy.setflags(write=False)
    return xx, yy


def _star_edge() -> tuple[float, float, float]:
    # Outward normal (nx, ny) and offset c of the edge from the outer vertex (1, 0) to the inner vertex at
    # 36 degrees; after folding angles into [0, 36] degrees a point is inside iff nx*x + ny*y <= c.
    a = math.pi / 5
    p1 = np.array([1.0, 0.0])
    p2 = np.array([_STAR_INNER * math.cos(a), _STAR_INNER * math.sin(a)])
    d = p2 - p1
    n = np.array([d[1], -d[0]])
    if n @ p1 < 0:
        n = -n
    return float(n[0]), float(n[1]), float(n @ p1)


_STAR_NX, _STAR_NY, _STAR_C = _star_edge()


def shape_mask(shape: str, size: float, cx: float, cy: float, angle: float, image_size: int) -> np.ndarray:
    """Boolean ``[H, W]`` mask of one shape; ``size`` is the shape's size parameter (see ``_AREA_FACTOR``)."""
    xx, yy = _grid(image_size)
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    if shape == "circle":
        return dx * dx + dy * dy <= size * size
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= size * size) & (d2 >= (_RING_INNER * size) ** 2)
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    u, v = dx * c + dy * s, dy * c - dx * s
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= size
    if shape == "cross":
        au, av, w = np.abs(u), np.abs(v), _CROSS_HALF_WIDTH * size
        return ((au <= size) & (av <= w)) | ((au <= w) & (av <= size))
    if shape == "triangle":
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):  # three half-planes at the inradius, normals 120 degrees apart
            phi = math.pi / 2 + 2 * math.pi * k / 3
            inside &= u * np.float32(math.cos(phi)) + v * np.float32(math.sin(phi)) <= size / 2
        return inside
    if shape == "star":
        rho = np.sqrt(u * u + v * v)
        sector = np.float32(2 * math.pi / 5)
        a = np.mod(np.arctan2(v, u), sector)
        a = np.minimum(a, sector - a)  # angle from the nearest point, in [0, 36] degrees
        return rho * (_STAR_NX * np.cos(a) + _STAR_NY * np.sin(a)) <= _STAR_C * size
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def texture_mask(texture: str, rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Boolean ``[H, W]`` foreground of a background texture (all False for "plain")."""
    xx, yy = _grid(image_size)
    scale = image_size / 64
    if texture == "plain":
        return np.zeros((image_size, image_size), dtype=bool)
    period = max(rng.uniform(6.0, 10.0) * scale, 3.0)
    ox, oy = rng.uniform(0, period, size=2).astype(np.float32)
    if texture == "stripes":
        theta = rng.choice(4) * math.pi / 4
        t = xx * np.float32(math.cos(theta)) + yy * np.float32(math.sin(theta)) + ox
        return np.mod(t, period) < period / 2
    if texture == "dots":
        r = max(0.22 * period, 0.9)
        px = np.mod(xx + ox, period) - period / 2
        py = np.mod(yy + oy, period) - period / 2
        return px * px + py * py <= r * r
    if texture == "checkerboard":
        return (np.floor((xx + ox) / period) + np.floor((yy + oy) / period)) % 2 == 0
    raise ValueError(f"unknown texture {texture!r}; choose one of {', '.join(TEXTURES)}")


def render_scene(rng: np.random.Generator, image_size: int) -> dict:
    """Draw one scene: the per-pixel colour index and object index, plus what each object is.

    Returns a dict with ``colours`` (int ``[H, W]`` palette index), ``objects`` (int ``[H, W]``, -1 for
    background), ``shapes`` (shape index of each object), ``object_colours`` (colour index of each object),
    ``texture`` (texture index), ``texture_colour`` (colour index of the texture's pattern; unused for
    "plain"), ``label``.
    """
    area_scale = (image_size / 64) ** 2
    label = int(rng.integers(len(SHAPES)))
    n_objects = int(rng.integers(1, 4))
    texture = int(rng.integers(len(TEXTURES)))
    base = _BASES[int(rng.integers(2))]
    # Distinct colours, none equal to the texture's, so every outline stays visible.
    palette = rng.permutation(len(COLOURS))
    texture_colour, object_colours = int(palette[0]), palette[1:1 + n_objects]

    colours = np.full((image_size, image_size), base, dtype=np.int64)
    fg = texture_mask(TEXTURES[texture], rng, image_size)
    colours[fg] = texture_colour

    for attempt in range(_MAX_TRIES + 1):
        n = n_objects if attempt < _MAX_TRIES else 1  # give up on distractors rather than loop forever
        shapes = [label] + [int(s) for s in rng.integers(len(SHAPES), size=n - 1)]
        big = rng.uniform(*_BIG_AREA) * area_scale
        areas = [big] + list(rng.uniform(_SMALL_AREA_MIN * area_scale, big * _SMALL_AREA_MAX_RATIO, size=n - 1))
        order = rng.permutation(n)  # drawing order: later objects occlude earlier ones
        objects = np.full((image_size, image_size), -1, dtype=np.int64)
        drawn = np.zeros(n, dtype=np.int64)
        for k in order:
            name = SHAPES[shapes[k]]
            size = math.sqrt(areas[k] / _AREA_FACTOR[name])
            ext = min(size * _EXTENT[name], image_size / 2)
            cx, cy = rng.uniform(ext, image_size - ext, size=2)
            m = shape_mask(name, size, cx, cy, rng.uniform(0, 2 * math.pi), image_size)
            drawn[k] = m.sum()
            objects[m] = k
        visible = np.bincount(objects.ravel() + 1, minlength=n + 1)[1:]
        others = visible[1:]
        if (drawn.min() > 0 and (visible >= _MIN_VISIBLE * drawn).all()
                and (others.size == 0 or visible[0] >= _MIN_AREA_RATIO * others.max())):
            break
    obj_colours = np.asarray(object_colours[:n], dtype=np.int64)
    on = objects >= 0
    colours[on] = obj_colours[objects[on]]
    return {"colours": colours, "objects": objects, "shapes": np.asarray(shapes), "texture": texture,
            "label": label, "object_colours": obj_colours, "texture_colour": texture_colour}


def _pixel_shapes(scene: dict) -> np.ndarray:
    """int ``[H, W]``: the shape index of the object at each pixel, -1 on the background."""
    objects = scene["objects"]
    return np.where(objects >= 0, scene["shapes"][np.maximum(objects, 0)], -1)


def _concept_masks(pixel_shape: np.ndarray, colours: np.ndarray, texture: int) -> np.ndarray:
    """Bool ``[M, H, W]`` masks in ``CONCEPT_NAMES`` order: shapes, colours, then the (full-plane) texture."""
    h, w = colours.shape
    shape_masks = pixel_shape[None] == np.arange(len(SHAPES))[:, None, None]
    colour_masks = colours[None] == np.arange(len(COLOURS))[:, None, None]
    texture_masks = np.zeros((len(TEXTURES), h, w), dtype=bool)
    texture_masks[texture] = True
    return np.concatenate([shape_masks, colour_masks, texture_masks])


class ShapesConceptDataset(Dataset):
    """Shapes over textures, with exact masks for every shape, colour and texture concept.

    Concepts, in order: the 6 shapes (also the class names), the 8 colours, the 4 textures; see
    ``concept_names`` and the parallel ``concept_categories`` ("shape", "colour", "texture"). Shape masks
    are the visible pixels of that shape; colour masks are all pixels of that colour, shapes and texture
    alike; a texture mask covers the whole image, because a texture is an image-level concept.

    Args:
        num_samples: number of images.
        image_size: side in pixels; all sizes scale with it (64 and 32 are the tested sizes).
        seed: with ``split`` and the index, determines every image.
        transform: applied to the PIL image in ``__getitem__``; ``None`` returns the PIL image.
        split: "train", "val", "test" or "clip" (the concept CLIP's training images): independent random
            streams, so splits never share images and a split's content does not depend on the size of
            the others.
    """

    concept_names: list[str] = list(CONCEPT_NAMES)
    concept_categories: list[str] = list(CONCEPT_CATEGORIES)
    class_names: list[str] = list(SHAPES)

    def __init__(self, num_samples: int = 10000, image_size: int = 64, seed: int = 0,
                 transform: Optional[Callable] = None, split: str = "train"):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 for shapes to stay recognisable, got {image_size}")
        if split not in _STREAMS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(_STREAMS)}")
        self.num_samples, self.image_size, self.seed = num_samples, image_size, seed
        self.transform, self.split = transform, split
        self._images: Optional[np.ndarray] = None
        self._labels: Optional[np.ndarray] = None
        self._presence: Optional[torch.Tensor] = None
        self._pixel_shape: Optional[np.ndarray] = None  # int8 [N, H, W]: shape index per pixel, -1 background
        self._pixel_colour: Optional[np.ndarray] = None  # uint8 [N, H, W]: palette index per pixel
        self._texture: Optional[np.ndarray] = None  # int64 [N]

    def __len__(self) -> int:
        return self.num_samples

    def _check_index(self, i: int) -> int:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} samples")
        return int(i)

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _STREAMS[self.split], self._check_index(i)])

    def _scene(self, i: int) -> dict:
        return render_scene(self._rng(i), self.image_size)

    def sample(self, i: int) -> dict:
        """Image, label and concept ground truth of sample ``i``.

        Returns:
            dict with ``image`` (uint8 ``[H, W, 3]``), ``label`` (int), ``masks`` (bool ``[M, H, W]``,
            one per concept in ``concept_names``) and ``presence`` (float32 ``[M]``: mask is non-empty).
        """
        scene = self._scene(i)
        colours = scene["colours"]
        masks = _concept_masks(_pixel_shapes(scene), colours, scene["texture"])
        return {"image": _PALETTE[colours], "label": scene["label"], "masks": masks,
                "presence": masks.reshape(len(masks), -1).any(1).astype(np.float32)}

    def concept_masks(self, i: int) -> np.ndarray:
        """Bool ``[M, H, W]`` concept masks of sample ``i`` (as in :meth:`sample`); from memory once
        materialised, which is what lets training read them every step (planted units)."""
        if self._pixel_shape is None:
            return self.sample(i)["masks"]
        i = self._check_index(i)
        return _concept_masks(self._pixel_shape[i], self._pixel_colour[i], int(self._texture[i]))

    def materialize(self) -> "ShapesConceptDataset":
        """Render every image once and keep images, labels and presence in memory (~12 KB per 64px image).

        Training reads each image many times; rendering once makes an epoch a memory read. Called by
        :class:`ConceptDataModule` in ``setup`` so that DataLoader workers inherit the cache.
        """
        if self._images is None:
            n, s = self.num_samples, self.image_size
            images = np.empty((n, s, s, 3), dtype=np.uint8)
            labels = np.empty(n, dtype=np.int64)
            presence = np.zeros((n, len(CONCEPT_NAMES)), dtype=np.float32)
            pixel_shape = np.empty((n, s, s), dtype=np.int8)
            pixel_colour = np.empty((n, s, s), dtype=np.uint8)
            texture = np.empty(n, dtype=np.int64)
            n_shapes, n_colours = len(SHAPES), len(COLOURS)
            for i in range(n):
                scene = self._scene(i)
                images[i] = _PALETTE[scene["colours"]]
                labels[i] = scene["label"]
                visible = np.bincount(scene["objects"].ravel() + 1, minlength=len(scene["shapes"]) + 1)[1:]
                presence[i, scene["shapes"][visible > 0]] = 1.0
                presence[i, n_shapes:n_shapes + n_colours] = np.bincount(
                    scene["colours"].ravel(), minlength=len(_PALETTE))[:n_colours] > 0
                presence[i, n_shapes + n_colours + scene["texture"]] = 1.0
                pixel_shape[i], pixel_colour[i], texture[i] = _pixel_shapes(scene), scene["colours"], scene["texture"]
            self._images, self._labels = images, labels
            self._pixel_shape, self._pixel_colour, self._texture = pixel_shape, pixel_colour, texture
            self._presence = torch.from_numpy(presence)
        return self

    def presence_matrix(self) -> torch.Tensor:
        """Float ``[N, M]``: 1 where concept ``m`` appears in image ``n``. Cached after the first call."""
        return self.materialize()._presence

    @property
    def labels(self) -> torch.Tensor:
        """Long ``[N]`` class labels of every sample (renders the dataset once)."""
        return torch.from_numpy(self.materialize()._labels)

    def image(self, i: int) -> np.ndarray:
        """uint8 ``[H, W, 3]`` image of sample ``i``."""
        if self._images is not None:
            return self._images[self._check_index(i)]
        return _PALETTE[self._scene(i)["colours"]]

    def __getitem__(self, i: int):
        if self._images is not None:
            i = self._check_index(i)
            image, label = self._images[i], int(self._labels[i])
        else:
            scene = self._scene(i)
            image, label = _PALETTE[scene["colours"]], scene["label"]
        pil = Image.fromarray(image)
        return (pil if self.transform is None else self.transform(pil)), label
