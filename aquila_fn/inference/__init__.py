"""Serving: the KV-cached decoder (greedy, sampling, beam search, streaming text), sampling
transforms, weight-only quantization, and the compiled decode step (AOT package, CUDA graph)."""
