"""vdiff: a serving system for masked-diffusion language models (LLaDA, Dream)."""

__version__ = "0.1.0"
