"""Sampling, scorers, paired statistics, reports and plots, in-training validation."""
