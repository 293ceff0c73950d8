"""Evaluation: ranking and detection metrics, and every system under every condition."""
