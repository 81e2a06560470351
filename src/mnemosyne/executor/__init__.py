"""Executors run a step plan on the workers: in-process for one device, or over processes."""
