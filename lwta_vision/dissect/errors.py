"""Errors every method may raise."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights (CLIP, a captioner, a language model) could not be fetched: offline, blocked, or
    not in the local cache. The message says how to provide them."""
