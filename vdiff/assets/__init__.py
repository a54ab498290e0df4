"""Models that ship inside the package, loadable by name wherever a model path is accepted.

`vdiff-tiny` is a random-weight LLaDA-architecture checkpoint written by
`tools/make_tiny_model.py --arch llada` (2 layers, hidden 64, vocabulary 448, bfloat16, 300 KB):
it exercises every serving path in seconds on a CPU but its text is noise. It is the default
model of the Triton model repository and of `vdiff serve`.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
SHIPPED_MODELS = {"vdiff-tiny": ASSETS / "vdiff-tiny"}
DEFAULT_MODEL = "vdiff-tiny"


def shipped_model(name: str) -> Path | None:
    """The directory of a model that ships with vdiff, or None when `name` is not one."""
    return SHIPPED_MODELS.get(name)
