"""Training: the train step and optimizers, checkpoints, the Aquila sharding rules and pipeline
stages over `parallel`, pretraining and fine-tuning (full and LoRA) jobs."""
