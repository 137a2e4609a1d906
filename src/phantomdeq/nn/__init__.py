"""Building blocks for implicit layers: weight normalisations, variational dropout and the
Hutchinson estimate of the Jacobian's Frobenius norm (MDEQ-style regularisation)."""

from phantomdeq.nn.dropout import (
    VariationalDropout1d,
    VariationalDropout2d,
    reset_variational_dropout,
)
from phantomdeq.nn.jacobian import jacobian_frobenius_hutchinson
from phantomdeq.nn.norms import SpectralNorm, spectral_norm, update_norms, weight_norm

__all__ = [
    "SpectralNorm",
    "VariationalDropout1d",
    "VariationalDropout2d",
    "jacobian_frobenius_hutchinson",
    "reset_variational_dropout",
    "spectral_norm",
    "update_norms",
    "weight_norm",
]
