"""The ASTRO model in PyTorch, its data pipeline, training and checkpoints."""
