"""Sample-quality metrics."""

from .vectors import energy_distance, sliced_wasserstein

__all__ = ["energy_distance", "sliced_wasserstein"]
