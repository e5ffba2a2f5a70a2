"""The concept CLIP as a CLIP-Dissect scorer: CLIPScorer with the shipped (or given) weights."""
from __future__ import annotations

from typing import Optional

from lwta_vision.concept_clip import CONCEPT_WORDS, default_checkpoint, register
from lwta_vision.dissect.clip_dissect.clip import CLIPScorer


class ConceptCLIPScorer(CLIPScorer):
    """:class:`CLIPScorer` over the concept CLIP (``lwta-concept-clip``): CLIP-Dissect proper, offline.

    Its default concept set is the 18 words it was trained on (``concept_names``: the generated data's
    shapes, colours and textures); other words were never seen and would get arbitrary embeddings.

    Args:
        checkpoint: weights file; default the weights shipped in the package.
        **kwargs: the other :class:`CLIPScorer` arguments (device, batch_size, cache_dir, precision, ...).
    """

    concept_names = list(CONCEPT_WORDS)

    def __init__(self, checkpoint: Optional[str] = None, device: str = "cpu", batch_size: int = 256,
                 num_workers: int = 0, cache_dir: Optional[str] = None, precision: str = "fp32",
                 use_cache: bool = True, progress: bool = False):
        super().__init__(model_name=register(), pretrained=None, checkpoint=default_checkpoint(checkpoint),
                         device=device, batch_size=batch_size, num_workers=num_workers, cache_dir=cache_dir,
                         precision=precision, use_cache=use_cache, progress=progress)

    def __repr__(self) -> str:
        return f"ConceptCLIPScorer(checkpoint={self.checkpoint!r}, device={str(self.device)!r})"
