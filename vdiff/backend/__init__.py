"""What the Triton Python-backend models call: request parsing, the denoising service, text deltas, metrics.

Nothing here imports Triton; the thin `model.py` files in model_repository/ turn Triton tensors
into the plain values these modules take, and their results back into responses.
"""
