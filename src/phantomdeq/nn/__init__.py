"""Building blocks for implicit layers: weight normalisations (per layer, or over a whole model
like TorchDEQ's ``apply_norm``), variational dropout and the Hutchinson estimate of the
Jacobian's Frobenius norm (MDEQ-style regularisation)."""

from phantomdeq.nn.dropout import (
    VariationalDropout1d,
    VariationalDropout2d,
    VariationalDropout3d,
    reset_variational_dropout,
)
from phantomdeq.nn.jacobian import jacobian_frobenius_hutchinson
from phantomdeq.nn.model_norms import NORM_TARGETS, apply_norm, remove_norm
from phantomdeq.nn.norms import SpectralNorm, WeightNorm, spectral_norm, update_norms, weight_norm

__all__ = [
    "NORM_TARGETS",
    "SpectralNorm",
    "VariationalDropout1d",
    "VariationalDropout2d",
    "VariationalDropout3d",
    "WeightNorm",
    "apply_norm",
    "jacobian_frobenius_hutchinson",
    "remove_norm",
    "reset_variational_dropout",
    "spectral_norm",
    "update_norms",
    "weight_norm",
]
