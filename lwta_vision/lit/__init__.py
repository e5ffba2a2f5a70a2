"""Lightning modules (the only place, with data/callbacks/cli, that imports Lightning)."""
from lwta_vision.lit.classifier import LitClassifier, NonFiniteLossError

__all__ = ["LitClassifier", "NonFiniteLossError"]
