"""Turns a step plan into model inputs, runs the forward pass and samples."""
