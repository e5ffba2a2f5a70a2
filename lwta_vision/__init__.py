"""lwta_vision: stochastic Local-Winner-Takes-All vision networks, trained with Lightning and described in words."""

__version__ = "0.1.0"

from lwta_vision import _moved

_moved.install()
