"""Rank grid and the only calls into torch.distributed."""
