"""Training small transformers on synthetic tasks (config.py: the training config; data.py: the task's data and
vocabulary; trainer.py: transformers' Trainer around them). A trained run's folder is a checkpoint like any other:
`--model RUN_DIR` or `RUN_DIR/checkpoint-N` loads it through models/loading.py."""
