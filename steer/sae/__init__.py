"""Sparse autoencoders: load SAELens SAEs, train one, inspect features, steer with sliders."""

from steer.sae.loading import SparseAutoencoder, load_pretrained_sae, load_sae
from steer.sae.sliders import AddDecoder, Clamp, Scale, decoder_direction

__all__ = [
    "AddDecoder",
    "Clamp",
    "Scale",
    "SparseAutoencoder",
    "decoder_direction",
    "load_pretrained_sae",
    "load_sae",
]
