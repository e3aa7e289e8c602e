"""Per-token log-probabilities from hidden states and the LM head (fused unlearning loss)."""
