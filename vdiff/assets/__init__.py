"""Models that ship inside the package, loadable by name wherever a model path is accepted.

- `vdiff-demo` (the default model): a 0.9M-parameter LLaDA-architecture diffusion model trained by
  `tools/train_tiny.py` on the synthetic instruction task of `vdiff/training/demo_task.py`
  (arithmetic, sorting, reversing, spelling, counting), starting from `vdiff-demo-ar`'s weights;
  character tokenizer, bfloat16.
- `vdiff-demo-ar`: its autoregressive verifier for Adaptive Parallel Decoding, a 0.9M-parameter
  transformers Llama trained by the same tool on the same data, with the same tokenizer.
- `vdiff-tiny`: a random-weight LLaDA checkpoint written by `tools/make_tiny_model.py --arch llada`
  (2 layers, hidden 64, 300 KB). Its text is noise; it exercises the serving paths fastest.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
SHIPPED_MODELS = {name: ASSETS / name for name in ("vdiff-demo", "vdiff-demo-ar", "vdiff-tiny")}
DEFAULT_MODEL = "vdiff-demo"


def shipped_model(name: str) -> Path | None:
    """The directory of a model that ships with vdiff, or None when `name` is not one."""
    return SHIPPED_MODELS.get(name)
