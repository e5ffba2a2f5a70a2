"""Lightning callbacks."""
from lwta_vision.callbacks.checkpoint import LastModelCheckpoint
from lwta_vision.callbacks.dissection import NeuronDissection
from lwta_vision.callbacks.rng import RNGStateCheckpoint

__all__ = ["LastModelCheckpoint", "NeuronDissection", "RNGStateCheckpoint"]
