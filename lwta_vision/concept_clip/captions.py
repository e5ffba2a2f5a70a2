"""Captions of generated scenes, and which images each caption truthfully describes (pure numpy).

A caption is text plus the set of *atoms* it asserts. Atoms are what a scene can show: each shape, each
colour (anywhere in the image), each texture, and each (shape, colour) object. A caption describes an
image when every atom it asserts is in the image, so "red" describes every image with something red and
"a red circle on stripes" only images with a red circle over a striped background. That gives a
many-to-many positive matrix for a sigmoid contrastive loss: single concept words (what CLIP-Dissect
queries) are true of many images in a batch, and a softmax CLIP loss with one positive per row would
punish them as negatives.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lwta_vision.datasets.shapes import COLOURS, SHAPES, TEXTURES

NS, NC, NT = len(SHAPES), len(COLOURS), len(TEXTURES)
NUM_ATOMS = NS + NC + NT + NS * NC
CONCEPT_WORDS: tuple[str, ...] = SHAPES + COLOURS + TEXTURES  # atoms 0..17, in the dataset's concept order

# Phrases for a background texture besides the bare word.
_TEXTURE_PHRASES = {"plain": ("plain", "a plain background"), "stripes": ("stripes", "a striped background"),
                    "dots": ("dots", "a dotted background"),
                    "checkerboard": ("checkerboard", "a checkerboard background")}


def shape_atom(s: int) -> int:
    return s


def colour_atom(c: int) -> int:
    return NS + c


def texture_atom(t: int) -> int:
    return NS + NC + t


def object_atom(s: int, c: int) -> int:
    return NS + NC + NT + s * NC + c


@dataclass(frozen=True)
class SceneFacts:
    """What one image shows: its visible objects as (shape, colour) pairs, its texture, every colour."""

    objects: tuple[tuple[int, int], ...]
    texture: int
    colours: tuple[int, ...]

    def atoms(self) -> np.ndarray:
        out = np.zeros(NUM_ATOMS, dtype=np.float32)
        for s, c in self.objects:
            out[shape_atom(s)] = out[object_atom(s, c)] = 1
        for c in self.colours:
            out[colour_atom(c)] = 1
        out[texture_atom(self.texture)] = 1
        return out


def scene_facts(scene: dict) -> SceneFacts:
    """Facts of a :func:`lwta_vision.datasets.shapes.render_scene` result (visible objects only)."""
    objects = scene["objects"]
    visible = np.bincount(objects.ravel() + 1, minlength=len(scene["shapes"]) + 1)[1:] > 0
    pairs = tuple((int(s), int(c)) for s, c, v in zip(scene["shapes"], scene["object_colours"], visible) if v)
    colours = tuple(int(c) for c in np.flatnonzero(np.bincount(scene["colours"].ravel(), minlength=NC)[:NC]))
    return SceneFacts(pairs, int(scene["texture"]), colours)


def caption(rng: np.random.Generator, facts: SceneFacts, word_fraction: float = 0.5) -> tuple[str, np.ndarray]:
    """A random true caption of an image and the atoms it asserts.

    With probability ``word_fraction`` a single concept word (a shape, colour or texture in the image);
    otherwise a phrase naming some of the objects, each with or without its colour, optionally followed by
    the background texture ("a red circle and a star on a dotted background").
    """
    req = np.zeros(NUM_ATOMS, dtype=np.float32)
    objects = facts.objects
    if rng.random() < word_fraction:
        kind = int(rng.integers(3))
        if kind == 0:
            s, _ = objects[int(rng.integers(len(objects)))]
            req[shape_atom(s)] = 1
            return SHAPES[s], req
        if kind == 1:
            c = facts.colours[int(rng.integers(len(facts.colours)))]
            req[colour_atom(c)] = 1
            return COLOURS[c], req
        req[texture_atom(facts.texture)] = 1
        return TEXTURES[facts.texture], req
    k = int(rng.integers(1, len(objects) + 1))
    parts = []
    for j in rng.permutation(len(objects))[:k]:
        s, c = objects[int(j)]
        if rng.random() < 0.6:
            parts.append(f"a {COLOURS[c]} {SHAPES[s]}")
            req[object_atom(s, c)] = 1
        else:
            parts.append(f"a {SHAPES[s]}")
            req[shape_atom(s)] = 1
    text = " and ".join(parts)
    if rng.random() < 0.5:
        phrases = _TEXTURE_PHRASES[TEXTURES[facts.texture]]
        text += " on " + phrases[int(rng.integers(len(phrases)))]
        req[texture_atom(facts.texture)] = 1
    return text, req


def describes(requirements: np.ndarray, image_atoms: np.ndarray) -> np.ndarray:
    """[images, captions] boolean: caption j is true of image i (all its atoms are in the image)."""
    return (requirements @ (1.0 - image_atoms).T).T == 0


def word_requirements() -> np.ndarray:
    """[18, NUM_ATOMS] atoms of the single concept words, in :data:`CONCEPT_WORDS` order."""
    req = np.zeros((len(CONCEPT_WORDS), NUM_ATOMS), dtype=np.float32)
    req[np.arange(len(CONCEPT_WORDS)), np.arange(len(CONCEPT_WORDS))] = 1
    return req
