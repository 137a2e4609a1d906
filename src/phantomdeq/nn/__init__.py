"""Building blocks for implicit layers: weight normalisations (and, later, dropout, Jacobian terms)."""

from phantomdeq.nn.norms import SpectralNorm, spectral_norm, weight_norm

__all__ = ["SpectralNorm", "spectral_norm", "weight_norm"]

# Variational dropout and the Hutchinson Jacobian regulariser (MDEQ training).
from phantomdeq.nn.dropout import VariationalDropout2d, reset_variational_dropout  # noqa: E402
from phantomdeq.nn.jacobian import jacobian_frobenius_hutchinson  # noqa: E402

__all__ += ["VariationalDropout2d", "jacobian_frobenius_hutchinson", "reset_variational_dropout"]
