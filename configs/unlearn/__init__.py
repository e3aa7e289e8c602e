"""unlearn configs."""
