"""Decoding strategies, selected by SamplingParams.algorithm; importing this package registers them."""

from vdiff.decoding import apd, dream, llada
from vdiff.decoding.base import DecodingStrategy, algorithm_names, get_strategy, register

__all__ = ["DecodingStrategy", "algorithm_names", "apd", "dream", "get_strategy", "llada", "register"]
