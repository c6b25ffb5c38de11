"""Training: Lightning module, tasks, LM data, schedules, tracking and checkpoints."""
