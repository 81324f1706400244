"""Fine-tuning (full, LoRA, P-tuning, prefix) with checkpoints scored by the task's F1."""
