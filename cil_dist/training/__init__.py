"""Training a stage: its plan (stage), the teacher, the losses, precision, the optimiser and
schedule, checkpoints, preemption signals, validation during training and the loop (train)."""
