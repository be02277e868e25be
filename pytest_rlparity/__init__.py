"""pytest-rlparity: prove an inference engine returns the token logprobs an RL trainer expects.

The public API for custom parity tests; the fixtures come with the pytest plugin.
"""

from .compare import Comparison, assert_logprobs_close, compare_logprobs
from .engines.base import Completion, Engine, EngineInfo
from .errors import EngineError, GoldenError, ParityError
from .settings import SamplingSettings, Tolerance

__all__ = [
    "Comparison",
    "Completion",
    "Engine",
    "EngineError",
    "EngineInfo",
    "GoldenError",
    "ParityError",
    "SamplingSettings",
    "Tolerance",
    "assert_logprobs_close",
    "compare_logprobs",
]
