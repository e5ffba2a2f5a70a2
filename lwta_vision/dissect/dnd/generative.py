"""Local generative models for Describe-and-Dissect: captioner, summariser, text-to-image generator.

Each wrapper is a plain callable with the signature the DnD stages expect (:mod:`lwta_vision.dissect.dnd.selection`),
loads its model once, and is seeded per call, so a description is reproducible. transformers and diffusers
are optional (``pip install 'lwta_vision[dnd]'``); they are imported only when a wrapper is built, and a
missing one is a clear error naming the extra. Models come from a local folder or a Hugging Face hub name
(fetched once, then cached); when neither can be read the error says how to provide them. Never random
weights: a model whose weights file lacks some of its weights is refused (:class:`IncompleteModelError`).
"""
from __future__ import annotations

import importlib
import json
import os
import urllib.error
import urllib.request
from importlib import resources
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from lwta_vision.dissect.dnd.selection import Exemplar
from lwta_vision.dissect.errors import WeightsUnavailableError

DND_EXTRA = "pip install 'lwta_vision[dnd]'"
GENERATION_TEMPLATE = "One realistic image of {}"


class MissingExtraError(RuntimeError):
    """transformers or diffusers is not installed: the error names the extra to install."""


class IncompleteModelError(ValueError):
    """A model folder whose weights file lacks weights its architecture needs (transformers would initialise
    them randomly and only log it)."""


class SummarizerEndpointError(RuntimeError):
    """The OpenAI-compatible summariser endpoint cannot be reached or answers something unusable."""


def require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(f"Describe-and-Dissect needs the package {module!r} ({err}); install it with "
                                f"{DND_EXTRA}") from None


def load_prompt(name: str = "dnd_summarize") -> str:
    """A prompt template shipped with the package (``lwta_vision/dissect/dnd/prompts/<name>.txt``)."""
    return resources.files(__package__).joinpath("prompts", f"{name}.txt").read_text()


def summary_prompt(captions: Sequence[str], template: Optional[str] = None) -> str:
    lines = "\n".join(f"- {c.strip()}" for c in captions)
    return (template or load_prompt()).replace("{captions}", lines)


def _unavailable(kind: str, name: str, err: BaseException) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"could not load the {kind} model {name!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        f"Pass a local folder with the model (e.g. one saved by save_pretrained or downloaded once with "
        f"`hf download {name} --local-dir DIR` on a machine with network access)")


def _from_pretrained(auto_class, model: str, kind: str):
    """``auto_class.from_pretrained(model)``, refusing a checkpoint that does not hold every weight: a missing
    weight would be initialised randomly, with only a log line to say so."""
    try:
        net, info = auto_class.from_pretrained(model, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise _unavailable(kind, model, err) from None
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    if missing or mismatched:
        where = os.path.abspath(model) if os.path.isdir(model) else model
        parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:5])})"] if missing else []
        parts += [f"{len(mismatched)} with another shape (e.g. {', '.join(mismatched[:3])})"] if mismatched else []
        parts += [f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:5])})"] if unexpected else []
        raise IncompleteModelError(
            f"the {kind} model {where!r} does not hold every weight of its architecture "
            f"({type(net).__name__}): {'; '.join(parts)} keys; transformers would initialise them randomly. The "
            "weights file is incomplete or belongs to another architecture: download the model again (`hf download "
            "NAME --local-dir DIR`) or save it with save_pretrained, and pass that folder")
    return net


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


class HFCaptioner:
    """Image captions from a transformers image-to-text model (BLIP by default in dissect.py).

    Greedy decoding unless ``do_sample``; sampling is seeded per call.
    """

    def __init__(self, model: str, device: str = "cpu", max_new_tokens: int = 30, prompt: Optional[str] = None,
                 do_sample: bool = False, batch_size: int = 16):
        transformers = require("transformers")
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(model)
        except (OSError, ValueError) as err:
            raise _unavailable("captioning", model, err) from None
        self.model = _from_pretrained(transformers.AutoModelForImageTextToText, model, "captioning")
        self.model.to(device).eval()
        self.name, self.device, self.prompt = model, torch.device(device), prompt
        self.max_new_tokens, self.do_sample, self.batch_size = max_new_tokens, do_sample, batch_size

    @torch.no_grad()
    def __call__(self, exemplars: Sequence[Exemplar], seed: int) -> list[str]:
        _seed_all(seed)
        out = []
        for i in range(0, len(exemplars), self.batch_size):
            images = [e.image.convert("RGB") for e in exemplars[i:i + self.batch_size]]
            kwargs = {"images": images, "return_tensors": "pt"}
            if self.prompt:
                kwargs["text"] = [self.prompt] * len(images)
            inputs = self.processor(**kwargs).to(self.device)
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample)
            texts = self.processor.batch_decode(ids, skip_special_tokens=True)
            if self.prompt:  # some models echo the prompt
                texts = [t[len(self.prompt):] if t.startswith(self.prompt) else t for t in texts]
            out += [t.strip() for t in texts]
        return out


class HFSummarizer:
    """Captions -> a short concept with a local transformers causal language model.

    Uses the tokenizer's chat template when it has one, the plain prompt otherwise; sampling
    (``temperature``) is seeded per call, so rounds differ but reruns do not.
    """

    def __init__(self, model: str, device: str = "cpu", max_new_tokens: int = 12, temperature: float = 0.7,
                 template: Optional[str] = None):
        transformers = require("transformers")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError) as err:
            raise _unavailable("summarising", model, err) from None
        self.model = _from_pretrained(transformers.AutoModelForCausalLM, model, "summarising")
        self.model.to(device).eval()
        self.name, self.device, self.template = model, torch.device(device), template
        self.max_new_tokens, self.temperature = max_new_tokens, temperature

    @torch.no_grad()
    def __call__(self, captions: Sequence[str], seed: int) -> str:
        prompt = summary_prompt(captions, self.template)
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                     return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        ids = ids.to(self.device)
        _seed_all(seed)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                                  do_sample=self.temperature > 0, temperature=self.temperature or None,
                                  pad_token_id=pad)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


class OpenAISummarizer:
    """Captions -> a short concept through any OpenAI-compatible chat endpoint (llama.cpp, vLLM, OpenAI).

    ``base_url`` is the API root, e.g. ``http://127.0.0.1:8080/v1``; the API key is read from the
    environment variable ``api_key_env`` when set (local servers need none). ``seed`` is sent with each
    request; servers that honour it make the rounds reproducible.
    """

    def __init__(self, base_url: str, model: str = "default", api_key_env: str = "OPENAI_API_KEY",
                 temperature: float = 0.7, max_tokens: int = 16, timeout: float = 60.0,
                 template: Optional[str] = None):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"summarizer endpoint {base_url!r} must be an http(s) URL such as http://127.0.0.1:8080/v1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, os.environ.get(api_key_env) if api_key_env else None
        self.temperature, self.max_tokens, self.timeout, self.template = temperature, max_tokens, timeout, template

    def __call__(self, captions: Sequence[str], seed: int) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": summary_prompt(captions, self.template)}],
                "temperature": self.temperature, "max_tokens": self.max_tokens, "seed": int(seed)}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = json.loads(resp.read().decode())
        except urllib.error.HTTPError as err:
            raise SummarizerEndpointError(f"summarizer endpoint {self.url} answered HTTP {err.code}: "
                                          f"{err.read()[:200].decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError) as err:
            raise SummarizerEndpointError(
                f"cannot reach the summarizer endpoint {self.url} ({getattr(err, 'reason', err)}); start the server "
                "(e.g. llama.cpp `llama-server`, `vllm serve`) or fix --summarizer") from None
        except json.JSONDecodeError:
            raise SummarizerEndpointError(f"summarizer endpoint {self.url} did not answer JSON") from None
        try:
            return str(payload["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise SummarizerEndpointError(f"summarizer endpoint {self.url} answered without "
                                          f"choices[0].message.content: {str(payload)[:200]}") from None


class DiffusersGenerator:
    """Images of a concept from a diffusers text-to-image pipeline (Stable Diffusion in DnD).

    Prompt ``template.format(concept)`` (DnD's "One realistic image of {}"); a ``torch.Generator`` seeded
    per call makes the images reproducible on the same device and library versions.
    """

    def __init__(self, model: str, device: str = "cpu", num_inference_steps: int = 25, template: str = GENERATION_TEMPLATE,
                 image_size: Optional[int] = None, dtype: Optional[str] = None):
        diffusers = require("diffusers")
        kwargs = {"torch_dtype": getattr(torch, dtype)} if dtype else {}
        try:
            self.pipe = diffusers.AutoPipelineForText2Image.from_pretrained(model, **kwargs)
        except (OSError, ValueError) as err:
            raise _unavailable("text-to-image", model, err) from None
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.device, self.steps, self.template, self.size = torch.device(device), num_inference_steps, template, image_size

    @torch.no_grad()
    def __call__(self, concept: str, n: int, seed: int, exclude: Sequence[int] = ()) -> list[Image.Image]:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        size = {"height": self.size, "width": self.size} if self.size else {}
        out = self.pipe(self.template.format(concept), num_images_per_prompt=n, num_inference_steps=self.steps,
                        generator=gen, output_type="pil", **size)
        return list(out.images)


def clip_image_embedder(scorer):
    """Image-image similarity for DnD's weighting from a :class:`CLIPScorer` (uncached: images are transient)."""
    def embed(images: Sequence[Image.Image]) -> torch.Tensor:
        return scorer.encode_pil(images)
    return embed


class GroundTruthCaptioner:
    """A documented test double standing in for BLIP on the generated concept data: it *describes what is
    visible* in each exemplar (shapes with their colours, largest first, and the background texture with its
    pattern's colour) from the dataset's exact masks, e.g. "a red circle and a blue star on a green dots
    background". (Until the planted-units benchmark the pattern's colour was left out, so DnD could never
    name a unit that detects the colour of the textures.)

    Use it to measure the rest of Describe-and-Dissect without a captioning model; it needs a probe dataset
    with ``sample(i)`` masks (:class:`~lwta_vision.datasets.shapes.ShapesConceptDataset`).
    """

    def __init__(self, dataset, min_fraction: float = 0.02):
        if not hasattr(dataset, "sample") or not hasattr(dataset, "concept_categories"):
            raise ValueError("the ground-truth captioner needs the generated concept data (masks per image); use "
                             "a captioning model (--captioner PATH) for other data")
        self.dataset, self.min_fraction = dataset, min_fraction
        names, cats = list(dataset.concept_names), list(dataset.concept_categories)
        self.shapes = [(i, n) for i, (n, c) in enumerate(zip(names, cats)) if c == "shape"]
        self.colours = [(i, n) for i, (n, c) in enumerate(zip(names, cats)) if c == "colour"]
        self.textures = [(i, n) for i, (n, c) in enumerate(zip(names, cats)) if c == "texture"]

    def caption(self, source: int, box=None) -> str:
        masks = self.dataset.sample(source)["masks"]
        if box is not None:
            x0, y0, x1, y1 = box
            masks = masks[:, y0:y1, x0:x1]
        area = masks.shape[1] * masks.shape[2]
        things = []
        for i, name in self.shapes:
            px = int(masks[i].sum())
            if px >= self.min_fraction * area:
                colour = max(self.colours, key=lambda c: int((masks[c[0]] & masks[i]).sum()))[1]
                things.append((px, f"a {colour} {name}"))
        things = [t for _, t in sorted(things, key=lambda t: -t[0])]
        texture = next((n for i, n in self.textures if masks[i].any()), None)
        # the pattern's colour is visible too (a red stripes background): the background pixels' main colour
        background = ~masks[[i for i, _ in self.shapes]].any(0)
        px, colour = max(((int((masks[i] & background).sum()), n) for i, n in self.colours), default=(0, None))
        if texture and texture != "plain" and px >= self.min_fraction * area:
            texture = f"{colour} {texture}"
        if not things:
            return f"a {texture} background" if texture else "a plain background"
        text = " and ".join(things)
        return f"{text} on a {texture} background" if texture else text

    def __call__(self, exemplars: Sequence[Exemplar], seed: int) -> list[str]:
        return [self.caption(e.source, e.box) for e in exemplars]


class GeneratedConceptImages:
    """A documented test double standing in for Stable Diffusion on the generated concept data: "images of
    <concept>" are drawn from a fresh split of the generated dataset in which the concept is the *main*
    thing: a shape is the largest object, a colour is the largest object's colour, a texture is the
    background. A phrase ("red circle") needs all of its words; a phrase with no known word gets no images.

    The pool (``split``, default "test") never overlaps the probe split, as generated images would not.
    """

    def __init__(self, image_size: int = 32, pool_size: int = 2000, split: str = "test", seed: int = 0):
        from lwta_vision.datasets.shapes import COLOURS, SHAPES, TEXTURES, ShapesConceptDataset

        self.dataset = ShapesConceptDataset(pool_size, image_size=image_size, seed=seed, split=split)
        tags = []
        for i in range(pool_size):
            scene = self.dataset._scene(i)
            main = scene["colours"][scene["objects"] == 0]  # object 0 is the labelled (largest) one
            colour = COLOURS[int(np.bincount(main).argmax())]
            tags.append({SHAPES[scene["label"]], colour, TEXTURES[scene["texture"]]})
        self.tags, self.vocab = tags, set(SHAPES) | set(COLOURS) | set(TEXTURES)

    def __call__(self, concept: str, n: int, seed: int, exclude: Sequence[int] = ()) -> list[Image.Image]:
        words = [w for w in concept.lower().split() if w in self.vocab]
        if not words:
            return []
        match = [i for i, t in enumerate(self.tags) if all(w in t for w in words)]
        rng = np.random.default_rng(seed)
        pick = rng.choice(match, size=min(n, len(match)), replace=False) if match else []
        return [self.dataset[int(i)][0] for i in pick]


def caption_concepts(concept_names: Optional[Sequence[str]]):
    """A test double for the summariser on annotated data: every annotated concept that a unit's captions
    mention becomes a candidate (most mentioned first), so selection faces every distractor the captions hold."""
    if not concept_names:
        raise ValueError("--summarizer ground_truth needs a probe set with annotated concepts (the generated data)")
    names = [str(c).lower() for c in concept_names]

    def candidates(unit: int, exemplars: Sequence[Exemplar]) -> list[str]:
        counts = {n: sum(n in e.caption.lower().split() for e in exemplars) for n in names}
        return [n for n in sorted(names, key=lambda n: -counts[n]) if counts[n] > 0]
    return candidates
