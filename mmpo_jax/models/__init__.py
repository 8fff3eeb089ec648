"""The model: a Flax NNX decoder for the Llama family, and checkpoint import/export."""
