"""Model definitions (the Llama family) and the weight loaders that feed them."""
