"""ablations configs."""
