"""Training: the optimizer and schedule, the engine (single / DDP / DeepSpeed in one place), checkpoints, metrics, the loop."""
