"""The jobs behind scripts/pretrain.py and scripts/finetune.py: argument handling, the training
loop with logging, checkpointing and resume, and the samples or evaluations they end with. They
sit on top of every other subpackage."""
