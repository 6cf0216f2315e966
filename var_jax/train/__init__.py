"""Training system: sharding, optimiser, jitted steps, checkpoints, metrics, the loop, recipes."""
