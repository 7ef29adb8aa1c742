"""Interop: Hugging Face (safetensors, LlamaForCausalLM/AquilaForCausalLM directories) and
llama2.c checkpoints, to and from the native parameter pytree."""
