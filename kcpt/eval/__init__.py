"""Evaluation beyond the training losses: exam accuracy, forgetting/drift against the base model, and
lm-evaluation-harness runs on checkpoints."""
