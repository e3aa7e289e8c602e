"""sft configs."""
