"""Training: state, optimizer, jitted step, Orbax checkpoints, metrics and the loop."""
