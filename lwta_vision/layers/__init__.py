"""Pure-torch building blocks: the LWTA competition and the activation factory."""
from lwta_vision.layers.lwta import ACTIVATIONS, EVAL_MODES, LWTA, create_act, lwta, lwta_kl_uniform, lwta_modules

__all__ = ["ACTIVATIONS", "EVAL_MODES", "LWTA", "create_act", "lwta", "lwta_kl_uniform", "lwta_modules"]
from lwta_vision.layers.stats import LWTAStats, collect_lwta_stats, win_entropy  # noqa: E402

__all__ += ["LWTAStats", "collect_lwta_stats", "win_entropy"]
from lwta_vision.layers.implementation import describe as describe_implementation  # noqa: E402
from lwta_vision.layers.implementation import implementation  # noqa: E402

__all__ += ["describe_implementation", "implementation"]
