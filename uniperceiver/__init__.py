"""Uni-Perceiver: the text encoder, the shared decoder and the similarity readout of the generalist model."""
