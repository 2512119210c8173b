"""Training: optimiser and schedules, train state, the jitted step, and the loop."""
