"""The authors' forward passes restated in pytensor (Theano's maintained successor) with Theano's
conventions, as the reference dcgan_dist/authors.py's conversion is tested against: lib/ops.py's
batchnorm and deconv, cuDNN's true convolution, and the gen()/discrim() of
imagenet/load_pretrained.py and svhn/svhn_semisup_analysis.py (read, not copied).

- conv: a true convolution, y[o, i, j] = sum x[c, s*i + a, s*j + b] * w[o, c, k-1-a, k-1-b] on the
  zero-padded input (tests check it against pytensor's own convolve2d).
- deconv: literally the gradient of that convolution with respect to its input, taken by
  pytensor.grad, as the authors' GpuDnnConvGradI is.
- batchnorm: batch statistics (biased variance) unless u and s are given, epsilon 1e-8.

Never compiled: PYTENSOR_FLAGS asks for the pure-Python linker and no C compiler, so importing
this module starts no g++ (the fast tier forbids processes). Set before pytensor is imported.
"""

from __future__ import annotations

import os

os.environ["PYTENSOR_FLAGS"] = "cxx=,mode=FAST_COMPILE,linker=py,blas__ldflags="

import numpy as np  # noqa: E402
import pytensor  # noqa: E402
import pytensor.graph  # noqa: E402
import pytensor.tensor as pt  # noqa: E402

from dcgan_dist.models import PRESETS  # noqa: E402

EPSILON = 1e-8
UNOPTIMISED = pytensor.compile.mode.Mode(linker="py", optimizer=None)  # the graph as written: no rewriting pass (seconds)


def taps(side: int, k: int, stride: int, pad: int) -> np.ndarray:
    """(k*k, out*out, side*side) 0/1: tap (a, b) of output pixel (i, j) reads input pixel
    (s*i + a - p, s*j + b - p), or the zero padding (no 1 in that row)."""
    out = (side + 2 * pad - k) // stride + 1
    select = np.zeros((k, k, out, out, side, side))
    for a in range(k):
        for b in range(k):
            for i in range(out):
                for j in range(out):
                    y, x = stride * i + a - pad, stride * j + b - pad
                    if 0 <= y < side and 0 <= x < side:
                        select[a, b, i, j, y, x] = 1
    return select.reshape(k * k, out * out, side * side)


def conv(x, w: np.ndarray, shape: tuple[int, int, int, int], stride: int, pad: int):
    """dnn_conv(x, w, subsample=(s, s), border_mode=(p, p)) for an input of static `shape`: gathers
    by a 0/1 matrix, then sums each tap times the kernel read backwards. Dots only, so that
    pytensor's gradient of it is dots too (its gradient of slicing falls back to slow Python)."""
    n, c, side, _ = shape
    k = w.shape[-1]
    out = (side + 2 * pad - k) // stride + 1
    patches = pt.tensordot(x.reshape((n, c, side * side)), taps(side, k, stride, pad), axes=[[2], [2]])  # (N, C, k*k, out*out)
    flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1]).reshape(-1, c, k * k)  # convolution, not correlation
    return pt.tensordot(patches, flipped, axes=[[1, 2], [1, 2]]).dimshuffle(0, 2, 1).reshape((n, w.shape[0], out, out))


def deconv(x, w: np.ndarray, shape: tuple[int, int, int, int], stride: int, pad: int):
    """lib/ops.py deconv(x, w, subsample=(s, s), border_mode=(p, p)): the gradient, with respect
    to its input, of the convolution that maps a (C_out, s*H, s*W) image to x's shape."""
    n, _, h, width = shape
    image_shape = (n, w.shape[1], h * stride, width * stride)
    image = pt.tensor4("image", shape=image_shape)
    forward = conv(image, w, image_shape, stride, pad)
    gradient = pytensor.grad(None, wrt=image, known_grads={forward: x})
    # The convolution is linear: its gradient does not depend on the image it was taken at.
    return pytensor.graph.clone_replace(gradient, {image: pt.zeros(image_shape)})


def batchnorm(x, g, b, u=None, s=None):
    axes = [0, 2, 3] if x.ndim == 4 else [0]
    if u is None:
        u = pt.mean(x, axis=axes, keepdims=True)
        s = pt.mean(pt.sqr(x - u), axis=axes, keepdims=True)
    elif x.ndim == 4:
        u, s = u.reshape((1, -1, 1, 1)), s.reshape((1, -1, 1, 1))
    x = (x - u) / pt.sqrt(s + EPSILON)
    return x * g.reshape((1, -1, 1, 1)) + b.reshape((1, -1, 1, 1)) if x.ndim == 4 else x * g + b


def relu(x):
    return (x + abs(x)) / 2


def lrelu(x, leak: float = 0.2):
    return 0.5 * (1 + leak) * x + 0.5 * (1 - leak) * abs(x)


def generator(preset: str, params: list[np.ndarray], z: np.ndarray, stats: list[tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """gen(Z, w, g, b, w2, g2, b2, ..., wx) of the preset's layer stack; `stats` = (u, s) per
    BatchNorm (else batch statistics)."""
    stack = PRESETS[preset].layers
    given = iter(stats or [])
    Z = pt.matrix("Z")
    w, g, b, *rest = params
    h = relu(batchnorm(pt.dot(Z, w), g, b, *next(given, (None, None))))
    side, channels = 4, stack.projection
    h = h.reshape((len(z), channels, side, side))
    for filters, stride in stack.generator:
        h = deconv(h, rest.pop(0), (len(z), channels, side, side), stride, stack.padding)
        side, channels = side * stride, filters
        h = relu(batchnorm(h, rest.pop(0), rest.pop(0), *next(given, (None, None)))) if rest else pt.tanh(h)
    return pytensor.function([Z], h, mode=UNOPTIMISED)(z.astype(np.float64))


def discriminator(preset: str, params: list[np.ndarray], x: np.ndarray, stats: list[tuple[np.ndarray, np.ndarray]] | None = None
                  ) -> tuple[list[np.ndarray], np.ndarray]:
    """discrim(X, w, w2, g2, b2, ..., wy) before its sigmoid: (each conv block's output, logits)."""
    stack = PRESETS[preset].layers
    given = iter(stats or [])
    X = pt.tensor4("X")
    rest = list(params)
    h, side, channels, blocks = X, x.shape[-1], 3, []
    for index, (filters, stride) in enumerate(stack.discriminator):
        h = conv(h, rest.pop(0), (len(x), channels, side, side), stride, stack.padding)
        if index > 0:
            h = batchnorm(h, rest.pop(0), rest.pop(0), *next(given, (None, None)))
        h = lrelu(h)
        blocks.append(h)
        side, channels = side // stride, filters
    logits = pt.dot(h.flatten(2), rest.pop(0))
    outputs = pytensor.function([X], [*blocks, logits], mode=UNOPTIMISED)(x.astype(np.float64))
    return outputs[:-1], outputs[-1][:, 0]
