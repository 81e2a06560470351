"""Building blocks of the model: TP-sharded linears and embeddings, rotary, norm, sampler."""
