"""Decides, each step, which tokens of which requests to compute."""
