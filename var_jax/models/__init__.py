"""Flax NNX models: the multi-scale VQ-VAE tokenizer (``vqvae``) and the VAR transformer."""
