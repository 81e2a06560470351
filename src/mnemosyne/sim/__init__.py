"""`mnemosyne simulate`: the engine's scheduler on a virtual clock driven by the step-time model."""
