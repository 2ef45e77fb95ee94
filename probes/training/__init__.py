"""Training small transformers on synthetic tasks (config.py: the training config; generator.py: what a task's
generator gives; data.py: the table of generators, with N-back's and trees'; icl_data.py: in-context classification;
lm_data.py: language modelling; trainer.py: transformers' Trainer around them). A trained run's folder is a
checkpoint like any other: `--model RUN_DIR` or `RUN_DIR/checkpoint-N` loads it through models/loading.py."""
