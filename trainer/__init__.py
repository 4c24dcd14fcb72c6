"""The DeepSpeed learner, the training loop, checkpoints and export."""
