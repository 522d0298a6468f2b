"""Anomaly scores made decisions: calibrated percentiles, drift, explanations."""
