"""The training engine: objective, parallelism, checkpoints, metrics, the loop and the launcher."""
