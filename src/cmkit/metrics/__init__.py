"""Sample-quality metrics: distances between vector sets, and image metrics in the feature space
of cmkit's Fashion-MNIST classifier (Frechet distance, k-NN precision/recall)."""

from .frechet import frechet_distance, frechet_distance_features, gaussian_stats
from .precision_recall import precision_recall
from .vectors import energy_distance, sliced_wasserstein

__all__ = ["energy_distance", "frechet_distance", "frechet_distance_features", "gaussian_stats",
           "precision_recall", "sliced_wasserstein"]
