"""KV-cache block accounting. The scheduler sees block ids only; tensors live in the workers."""
