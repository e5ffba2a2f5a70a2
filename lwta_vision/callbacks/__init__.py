"""Lightning callbacks."""
from lwta_vision.callbacks.dissection import NeuronDissection

__all__ = ["NeuronDissection"]
