"""Datasets and mixtures: the built-in synthetic data, loaders for standard formats, tokenizer training."""
