"""Training: state, the jitted step, the optimizer, and the run loop."""
