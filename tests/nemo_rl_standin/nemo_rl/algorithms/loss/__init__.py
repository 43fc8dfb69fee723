"""Stand-in of ``nemo_rl.algorithms.loss``."""

from nemo_rl.algorithms.loss.interfaces import LossInputType, LossType  # noqa: F401
from nemo_rl.algorithms.loss.loss_functions import ClippedPGLossConfig, ClippedPGLossFn  # noqa: F401
