"""FID and KID between two sets of backbone features (rows = images).

FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to the two sets,
|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)). Biased upwards for small sets, so values are
comparable only at the same sample counts and backbone.
KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets; unbiased, so usable at small counts.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^(1/2)) is the sum of the square roots of S_a S_b's eigenvalues (real, >= 0),
    # and those are the squared singular values of X_a X_b^T / sqrt((n-1)(m-1)) for the centred
    # feature rows X: so no matrix square root (scipy's sqrtm takes minutes on 2048-d Inception
    # features on a CPU), and an n x m problem instead of d x d when the sets are smaller than d.
    if min(len(a), len(b)) < a.shape[1]:
        cross = (a - mu_a) @ (b - mu_b).T
        trace_sqrt = np.linalg.svd(cross, compute_uv=False).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    else:
        trace_sqrt = np.sqrt(np.clip(scipy.linalg.eigvals(cov_a @ cov_b).real, 0, None)).sum()
    distance = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    return float(max(distance, 0.0))


def kernel_inception_distance(
    features_a: np.ndarray, features_b: np.ndarray, subsets: int = 10, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over `subsets` random subsets of each set."""
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples in each set (got {len(a)} and {len(b)})")
    rng = np.random.default_rng(seed)
    dims = a.shape[1]
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        k_xx, k_yy, k_xy = ((x @ x.T) / dims + 1) ** 3, ((y @ y.T) / dims + 1) ** 3, ((x @ y.T) / dims + 1) ** 3
        # unbiased: the diagonals (each sample with itself) are left out
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (size * (size - 1))
        values.append(within - 2 * k_xy.mean())
    return float(np.mean(values)), float(np.std(values))
