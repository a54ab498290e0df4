"""vdiff: a serving system for masked-diffusion language models (LLaDA, Dream)."""

from vdiff.config import EngineConfig
from vdiff.engine import Engine
from vdiff.llm import LLM
from vdiff.outputs import GenerationOutput, RequestOutput
from vdiff.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "Engine", "EngineConfig", "GenerationOutput", "RequestOutput", "SamplingParams", "__version__"]
