"""Serving: the KV-cached decoder (decoder: greedy, sampling, streaming; beam: beam search; text:
stop strings and chat prompts; loading: models in any format), sampling transforms, and the
compiled decode step (steps: the step functions; aot_package / aot_build: the ahead-of-time
package; decode_compile: when to use it; step_graph: CUDA graph replay). `generate` gathers the
public names in one import."""
