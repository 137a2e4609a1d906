"""Building blocks for implicit layers: weight normalisations (and, later, dropout, Jacobian terms)."""

from phantomdeq.nn.norms import SpectralNorm, spectral_norm, weight_norm

__all__ = ["SpectralNorm", "spectral_norm", "weight_norm"]
