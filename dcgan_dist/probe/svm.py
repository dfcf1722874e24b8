"""The probe's L2-SVM: one-vs-rest, squared hinge, L2 penalty, as liblinear's (scikit-learn's
`LinearSVC(loss="squared_hinge")`) with the same meaning of C, solved two ways:

- `liblinear`: scikit-learn's LinearSVC. It copies the features to float64 plus its own
  index/value pairs (about 20 bytes per value: 26 GB for 45,000 x 28,672).
- `torch`: the same problem in the primal on the features as they are held (float16 or float32,
  never copied whole): X @ W and X.T @ R a chunk of rows at a time, each chunk upcast to float32,
  sums and the weights in float64; on CPU threads or a CUDA device.

The problem, for each class k against the rest (y_i = +1 for class k, -1 otherwise; with two
classes one problem, for the second class, as liblinear):

    min_w  0.5 * ||w||^2 + C * sum_i max(0, 1 - y_i * (w . [x_i, 1]))^2

The bias is the weight of a constant feature 1 and is regularised with the rest (LinearSVC's
`intercept_scaling=1`). The torch solver is a Newton method with (diagonally preconditioned) conjugate gradients on
the generalised Hessian I + 2C X_A^T X_A (A: the samples inside the margin), as liblinear's primal
solver for this loss, with an exact line search (the objective along a direction is a convex
piecewise quadratic in the step, minimised on the stored margins without passes over X); a
conjugate-gradient step's two products share one pass over X. Each fit of a C grid on one
training set starts at the last's solution (TorchSvm).
Convergence: ||grad f(w)|| <= tol * ||grad f(0)|| for every class (liblinear's relative
gradient-norm rule, tighter by default: TOL); a fit that stops at max_iter first says so
(`converged` False, a warning the probe counts, prints and tags in MLflow).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

SOLVERS = ("torch", "liblinear")  # choices.SVM_SOLVERS
TOL = 1e-5  # relative gradient norm of the torch solver's stop
MAX_ITER = 100  # Newton iterations
CG_TOL = 0.1  # liblinear's eps_cg: each Newton direction's CG stops at 0.1 x the gradient's norm
CG_MAX_ITER = 250
GRAM_SAMPLES = 2048  # up to here, fewer samples than features: solved on the Gram matrix's n x n factor
CHUNK_VALUES = 1 << 24  # feature values upcast at a time (64 MB of float32)


class SvmNotConverged(UserWarning):
    """A fit stopped at max_iter before its convergence criterion held."""


@dataclass
class LinearSvm:
    """What scoring needs (LinearSVC's attribute names) and how the fit ended."""

    coef_: np.ndarray  # (classifiers, dims) float32
    intercept_: np.ndarray  # (classifiers,)
    classes_: np.ndarray
    converged: bool = True
    iterations: int = 0
    objective: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per classifier, at the solution


def targets(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes, n x classifiers of +-1): one-vs-rest, a single classifier for two classes."""
    classes = np.unique(labels)
    positive = classes[1:] if len(classes) == 2 else classes
    return classes, np.where(labels[:, None] == positive[None, :], 1.0, -1.0)


class _Rows:
    """The feature matrix held once, read in row chunks upcast to float32 on `device`."""

    def __init__(self, features: np.ndarray, device: str):
        self.matrix = torch.from_numpy(np.ascontiguousarray(features))  # no copy for a C-ordered array
        if device != "cpu":
            self.matrix = self.matrix.to(device)  # held once there, in its own dtype
        self.device, self.rows = device, max(1, CHUNK_VALUES // max(1, features.shape[1]))

    def chunks(self):
        """(first row, the chunk in float32); a float16 chunk is upcast into one buffer reused by
        every chunk (on CPU 8 ms a 64 MB chunk; into a new array or tensor each time, 27-45 ms),
        so each chunk is valid only until the next is read."""
        buffer = None
        for start in range(0, len(self.matrix), self.rows):
            chunk = self.matrix[start : start + self.rows]
            if chunk.dtype == torch.float32:
                yield start, chunk
                continue
            if buffer is None:
                buffer = torch.empty((min(self.rows, len(self.matrix)), chunk.shape[1]), dtype=torch.float32, device=self.device)
            yield start, buffer[: len(chunk)].copy_(chunk)

    def squares_times(self, active: torch.Tensor) -> torch.Tensor:
        """(X * X).T @ A: (d, k) float64, the diagonal of X_A^T X_A per column."""
        total = torch.zeros((self.matrix.shape[1], active.shape[1]), dtype=torch.float64, device=self.device)
        a32 = active.T.to(torch.float32).contiguous()
        for start, chunk in self.chunks():
            total += (a32[:, start : start + len(chunk)] @ chunk.square()).T.double()
        return total

    def times(self, weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """X @ W + b: (n, k) float64."""
        out = torch.empty((len(self.matrix), weights.shape[1]), dtype=torch.float64, device=self.device)
        w32 = weights.T.to(torch.float32).contiguous()  # (k, d) @ chunk.T: far faster than chunk @ (d, k) for small k
        for start, chunk in self.chunks():
            out[start : start + len(chunk)] = (w32 @ chunk.T).T
        return out + bias

    def transposed_times(self, residuals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(X.T @ R, the bias column's sum of R): (d, k) and (k,), float64."""
        total = torch.zeros((self.matrix.shape[1], residuals.shape[1]), dtype=torch.float64, device=self.device)
        r32 = residuals.T.to(torch.float32).contiguous()
        for start, chunk in self.chunks():
            total += (r32[:, start : start + len(chunk)] @ chunk).T.double()
        return total, residuals.sum(0)

    def hessian_times(self, weights: torch.Tensor, bias: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """transposed_times(A * times(W, b)) in one pass over X: each chunk is upcast once for
        both products, the same arithmetic as the two calls."""
        total = torch.zeros((self.matrix.shape[1], weights.shape[1]), dtype=torch.float64, device=self.device)
        w32 = weights.T.to(torch.float32).contiguous()
        bias_sum = torch.zeros_like(bias)
        for start, chunk in self.chunks():
            rows = slice(start, start + len(chunk))
            product = ((w32 @ chunk.T).T.double() + bias) * active[rows]
            total += (product.T.to(torch.float32).contiguous() @ chunk).T.double()
            bias_sum += product.sum(0)
        return total, bias_sum


class _Factor:
    """The n x n lower-triangular L with L L^T = [X, 1] [X, 1]^T (float64): for n < d the problem
    in z with features L is the problem in w (w = [X, 1]^T L^-T z, the same margins and norm), and
    its products cost n^2 instead of n d. The bias is inside L, so it has none of its own."""

    def __init__(self, rows: _Rows):
        matrix, n = rows.matrix, len(rows.matrix)
        gram = torch.ones((n, n), dtype=torch.float64, device=rows.device)  # the bias column's 1 . 1
        step = max(1, CHUNK_VALUES // max(1, n))
        for start in range(0, matrix.shape[1], step):
            block = matrix[:, start : start + step].to(torch.float64)
            gram += block @ block.T
        gram.diagonal().add_(1e-10 * gram.diagonal().mean())  # duplicate rows: positive definite all the same
        self.factor, self.device = torch.linalg.cholesky(gram), rows.device

    def times(self, weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.factor @ weights

    def transposed_times(self, residuals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.factor.T @ residuals, torch.zeros(residuals.shape[1], dtype=torch.float64, device=self.device)

    def squares_times(self, active: torch.Tensor) -> torch.Tensor:
        return self.factor.square().T @ active

    def hessian_times(self, weights: torch.Tensor, bias: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transposed_times(self.times(weights, bias) * active)

    def weights(self, rows: _Rows, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, b) = [X, 1]^T L^-T z."""
        return rows.transposed_times(torch.linalg.solve_triangular(self.factor.T, z, upper=True))


def objective_values(weights, bias, margins, c: float) -> torch.Tensor:
    """Per classifier: 0.5 ||[w, b]||^2 + C sum max(0, 1 - y z)^2, from margins = 1 - y z."""
    hinge = margins.clamp(min=0)
    return 0.5 * (weights.square().sum(0) + bias.square()) + c * hinge.square().sum(0)


def _conjugate_gradient(rows: _Rows | _Factor, active: torch.Tensor, grad_w, grad_b, c: float):
    """Newton directions (d, k) and (k,) solving (I + 2C X_A^T X_A) d = -g per column until the
    residual is CG_TOL of the gradient; conjugate gradients preconditioned by the diagonal (as
    liblinear's since 2.20)."""
    diag_w, diag_b = 1 + 2 * c * rows.squares_times(active), 1 + 2 * c * active.sum(0)
    dir_w, dir_b = torch.zeros_like(grad_w), torch.zeros_like(grad_b)
    res_w, res_b = -grad_w, -grad_b
    p_w, p_b = res_w / diag_w, res_b / diag_b
    rz = (res_w * p_w).sum(0) + res_b * p_b
    goal = (CG_TOL**2) * (res_w.square().sum(0) + res_b.square())
    for _ in range(CG_MAX_ITER):
        open_columns = res_w.square().sum(0) + res_b.square() > goal
        if not open_columns.any():
            break
        hp_w, hp_b = rows.hessian_times(p_w, p_b, active)
        hp_w, hp_b = p_w + 2 * c * hp_w, p_b + 2 * c * hp_b
        curvature = (p_w * hp_w).sum(0) + p_b * hp_b
        alpha = torch.where(open_columns, rz / curvature, torch.zeros_like(rz))
        dir_w += alpha * p_w
        dir_b += alpha * p_b
        res_w -= alpha * hp_w
        res_b -= alpha * hp_b
        z_w, z_b = res_w / diag_w, res_b / diag_b
        rz_new = (res_w * z_w).sum(0) + res_b * z_b
        beta = torch.where(open_columns, rz_new / rz, torch.zeros_like(rz))
        p_w, p_b, rz = z_w + beta * p_w, z_b + beta * p_b, rz_new
    return dir_w, dir_b


def _line_search(weights, bias, dir_w, dir_b, scores, step_scores, y, c: float) -> torch.Tensor:
    """The exact minimiser t >= 0 per column of f(w + t d), a convex C^1 piecewise quadratic in t:
    safeguarded Newton on f'(t), on the stored scores z and X d (no pass over X)."""
    wd = (weights * dir_w).sum(0) + bias * dir_b
    dd = dir_w.square().sum(0) + dir_b.square()
    lo, hi = torch.zeros_like(dd), torch.full_like(dd, float("inf"))
    t = torch.ones_like(dd)
    for _ in range(60):
        margins = 1 - y * (scores + t * step_scores)
        inside = margins > 0
        slope = wd + t * dd - 2 * c * (inside * y * step_scores * margins).sum(0)
        curve = dd + 2 * c * (inside * step_scores.square()).sum(0)
        lo, hi = torch.where(slope < 0, t, lo), torch.where(slope >= 0, t, hi)
        if (slope.abs() <= 1e-12 * (dd + curve) + 1e-300).all():
            break
        newton = t - slope / curve
        bisect = torch.where(torch.isinf(hi), 2 * t, (lo + hi) / 2)
        t = torch.where((newton > lo) & (newton < hi), newton, bisect)
    return t


def _newton(rows: _Rows | _Factor, dims: int, y: torch.Tensor, c: float, tol: float, max_iter: int, start=None):
    """(weights, bias, scores, converged, iterations) of Newton-CG (module docstring) from w = 0,
    or from `start`: (weights, bias, scores, ||[X^T y, sum y]||), a solution at another C and
    what the gradient at w = 0 is made of (2C times it: the stop stays relative to f's at 0)."""
    if start is None:
        weights = torch.zeros((dims, y.shape[1]), dtype=torch.float64, device=y.device)
        bias = torch.zeros(y.shape[1], dtype=torch.float64, device=y.device)
        scores, first_norm = torch.zeros_like(y), None
    else:
        weights, bias, scores, first_norm = *start[:3], 2 * c * start[3]
    for iteration in range(1, max_iter + 1):
        margins = 1 - y * scores
        active = (margins > 0).double()
        grad_w, grad_b = rows.transposed_times(active * y * margins)
        grad_w, grad_b = weights - 2 * c * grad_w, bias - 2 * c * grad_b
        norm = (grad_w.square().sum(0) + grad_b.square()).sqrt()
        first_norm = norm if first_norm is None else first_norm
        if (norm <= tol * first_norm).all():
            return weights, bias, scores, True, iteration
        dir_w, dir_b = _conjugate_gradient(rows, active, grad_w, grad_b, c)
        step_scores = rows.times(dir_w, dir_b)
        step = _line_search(weights, bias, dir_w, dir_b, scores, step_scores, y, c)
        weights, bias, scores = weights + step * dir_w, bias + step * dir_b, scores + step * step_scores
    return weights, bias, scores, False, max_iter


class TorchSvm:
    """One training set's torch L2-SVMs at any number of C: the features held once (where there
    are fewer samples than features, at most GRAM_SAMPLES, the Gram matrix's factor computed
    once), and each fit starting at the solution of the one before (a C grid in increasing
    order, as liblinear's own search for C). Over the probe's grid of 9 C: 57 Newton iterations
    instead of 67 for 3,000 x 512 synthetic features, 60 instead of 105 and 1.8x faster for
    600 x 2,048 (factor computed once)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, device: str = "cpu"):
        self.rows = _Rows(features, device)
        self.classes, signs = targets(labels)
        self.y = torch.from_numpy(signs).to(device)
        gram = len(features) < features.shape[1] and len(features) <= GRAM_SAMPLES
        self.factor = _Factor(self.rows) if gram else None
        self.dims = len(features) if gram else features.shape[1]
        self.last = None  # (weights, bias, scores) of the last fit, in the solved problem's terms
        self.unit_norm = None  # ||[X^T y, sum y]||: the gradient at w = 0 over 2C

    def fit(self, c: float, tol: float = TOL, max_iter: int = MAX_ITER) -> LinearSvm:
        """The SVM at `c`, from the last fit's solution; warns SvmNotConverged at max_iter."""
        solved = self.rows if self.factor is None else self.factor
        start = None
        if self.last is not None:
            if self.unit_norm is None:  # one pass, paid by the second fit (a single fit needs none)
                gradient_w, gradient_b = solved.transposed_times(self.y)
                self.unit_norm = (gradient_w.square().sum(0) + gradient_b.square()).sqrt()
            start = (*self.last, self.unit_norm)
        weights, bias, scores, converged, iterations = _newton(solved, self.dims, self.y, c, tol, max_iter, start)
        self.last = (weights, bias, scores)
        if not converged:
            warnings.warn(f"torch L2-SVM (C={c:g}) stopped after {max_iter} Newton iterations with the gradient norm above "
                          f"{tol:g} of its value at w = 0", SvmNotConverged, stacklevel=2)
        if self.factor is not None:
            weights, bias = self.factor.weights(self.rows, weights)
        return LinearSvm(weights.T.float().cpu().numpy(), bias.float().cpu().numpy(), self.classes, converged, iterations,
                         objective_values(weights, bias, 1 - self.y * scores, c).cpu().numpy())


def fit_torch(features: np.ndarray, labels: np.ndarray, c: float, device: str = "cpu", tol: float = TOL,
              max_iter: int = MAX_ITER) -> LinearSvm:
    """One torch L2-SVM (TorchSvm): Newton-CG in the primal (module docstring), on the n x n
    factor of the Gram matrix where there are fewer samples than features."""
    return TorchSvm(features, labels, device).fit(c, tol, max_iter)


def fit_liblinear(features: np.ndarray, labels: np.ndarray, c: float, tol: float = 1e-4, max_iter: int = 1000) -> LinearSvm:
    """scikit-learn's LinearSVC (a float64 copy of the features); warns SvmNotConverged as liblinear does."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    svm = LinearSVC(C=c, loss="squared_hinge", tol=tol, max_iter=max_iter, random_state=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svm.fit(features, labels)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    if not converged:
        warnings.warn(f"liblinear L2-SVM (C={c:g}) stopped at max_iter={max_iter}", SvmNotConverged, stacklevel=2)
    return LinearSvm(svm.coef_.astype(np.float32), svm.intercept_.astype(np.float32), svm.classes_, converged,
                     int(np.max(svm.n_iter_)))


def objective(features: np.ndarray, labels: np.ndarray, svm: LinearSvm, c: float) -> np.ndarray:
    """The objective per classifier of any fit's (coef_, intercept_), in float64 a chunk at a time."""
    rows = _Rows(features, "cpu")
    _, signs = targets(labels)
    weights = torch.from_numpy(svm.coef_.T.astype(np.float64))
    bias = torch.from_numpy(np.asarray(svm.intercept_, dtype=np.float64))
    margins = 1 - torch.from_numpy(signs) * rows.times(weights, bias)
    return objective_values(weights, bias, margins, c).numpy()
