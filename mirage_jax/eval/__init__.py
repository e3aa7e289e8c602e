"""Evaluation: teacher-forced scoring, generation-based safety/utility metrics, judges."""
