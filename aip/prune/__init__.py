"""Channel pruning: criteria, capacity limits, schedules and the interval pruner (knows nothing of training)."""
