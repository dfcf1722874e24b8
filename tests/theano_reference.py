"""The authors' forward passes restated in pytensor (Theano's maintained successor) with Theano's
conventions, as the reference dcgan_dist/authors/weights.py's conversion is tested against: lib/ops.py's
batchnorm and deconv, cuDNN's true convolution, and the gen()/discrim() of
imagenet/load_pretrained.py and svhn/svhn_semisup_analysis.py (read, not copied).

- conv: a true convolution, y[o, i, j] = sum x[c, s*i + a, s*j + b] * w[o, c, k-1-a, k-1-b] on the
  zero-padded input (tests check it against pytensor's own convolve2d).
- deconv: literally the gradient of that convolution with respect to its input, taken by
  pytensor.grad, as the authors' GpuDnnConvGradI is.
- batchnorm: batch statistics (biased variance) unless u and s are given, epsilon 1e-8.

The networks (kernel, each layer's width, stride and border, in order) are written here from the
authors' files, not taken from dcgan_dist's presets: the reference is the code under test's check,
so it holds its own copy of those numbers (NETWORKS).

Never compiled: PYTENSOR_FLAGS asks for the pure-Python linker and no C compiler, so importing
this module starts no g++ (the fast tier forbids processes). Set before pytensor is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

os.environ["PYTENSOR_FLAGS"] = "cxx=,mode=FAST_COMPILE,linker=py,blas__ldflags="

import numpy as np  # noqa: E402
import pytensor  # noqa: E402
import pytensor.graph  # noqa: E402
import pytensor.tensor as pt  # noqa: E402

EPSILON = 1e-8  # lib/ops.py:52 batchnorm(..., e=1e-8)
UNOPTIMISED = pytensor.compile.mode.Mode(linker="py", optimizer=None)  # the graph as written: no rewriting pass (seconds)


@dataclass(frozen=True)
class Network:
    """One of the authors' G/D pairs: (filters, stride, border) of each conv, first to last."""

    z_dim: int
    kernel: int
    projection: int  # channels of G's 4x4 reshape of T.dot(Z, w)
    gen: tuple[tuple[int, int, int], ...]  # deconvs; the last makes the 3 image channels
    discrim: tuple[tuple[int, int, int], ...]  # convs of the 32 px image; the last feeds wy


# Newmu/dcgan_code at ee12b2d15a3856794b8dae77d1eb263c67c36e47. Strides and borders are the
# subsample=(s, s) and border_mode=(p, p) of each dnn_conv/deconv call; widths the code does not
# spell out are from the .npy headers of the model folders it loads (numbered in argument order).
NETWORKS = {
    # imagenet/load_pretrained.py: nz = 256 (line 29), ngf = ndf = 128 (lines 32-33), 3x3 kernels
    # ('..._7l_3x3_256z', line 40; every *_params.jl_NN.npy kernel is 3x3).
    "imagenet32": Network(
        z_dim=256,
        kernel=3,
        projection=512,  # line 46: h.reshape((h.shape[0], ngf*4, 4, 4))
        # gen(), lines 47-52: w2..w6 and wx; widths from 30_gen_params.jl_05/08/11/14/17 (g2..g6)
        # and jl_19 (wx: 128, 3, 3, 3)
        gen=((512, 2, 1), (256, 1, 1), (256, 2, 1), (128, 1, 1), (128, 2, 1), (3, 1, 1)),
        # discrim(), lines 56-61: w (ndf = 128) and w2..w6; widths from 30_discrim_params.jl_02/05/
        # 08 (w2, w3, w4: 128, 256, 256 out) and jl_12/15 (g5, g6: 512, 512)
        discrim=((128, 1, 1), (128, 2, 1), (256, 1, 1), (256, 2, 1), (512, 1, 1), (512, 2, 1)),
    ),
    # svhn/svhn_semisup_analysis.py ('..._100z_...', line 44). The released code has no SVHN gen():
    # G's widths and kernels are its 200_gen_params.jl_NN.npy shapes, (100, 4096) (256, 128, 5, 5)
    # (128, 64, 5, 5) (64, 3, 5, 5); 4096 = 256 x 4 x 4. Its strides and borders are the only ones
    # that fit: three deconvs from 4 to 32 px double each time, and a 5x5 conv that halves 2H to
    # H with stride 2 needs border 2 (the border D uses, lines 92-94).
    "svhn32": Network(
        z_dim=100,
        kernel=5,
        projection=256,
        gen=((128, 2, 2), (64, 2, 2), (3, 2, 2)),
        # model(), lines 92-94: subsample=(2, 2), border_mode=(2, 2) for w, w2, w3; widths 128 and
        # 256 of h2 and h3 (line 71), 64 of w (200_discrim_params.jl_01.npy: 64, 3, 5, 5)
        discrim=((64, 2, 2), (128, 2, 2), (256, 2, 2)),
    ),
}


def param_shapes(network: str) -> dict[str, list[tuple[int, ...]]]:
    """The arrays of gen() and discrim(), in argument order, as NETWORKS implies them: a conv's
    kernel (out, in, k, k), a deconv's (in, out, k, k), a BatchNorm's g and b, T.dot's (in, out)."""
    spec = NETWORKS[network]
    k, features = spec.kernel, 16 * spec.projection
    gen: list[tuple[int, ...]] = [(spec.z_dim, features), (features,), (features,)]
    channels = spec.projection
    for index, (filters, _, _) in enumerate(spec.gen):
        gen.append((channels, filters, k, k))
        gen += [(filters,), (filters,)] if index < len(spec.gen) - 1 else []  # tanh(deconv(h, wx)): no BN
        channels = filters
    discrim: list[tuple[int, ...]] = []
    channels = 3
    for index, (filters, _, _) in enumerate(spec.discrim):
        discrim.append((filters, channels, k, k))
        discrim += [(filters,), (filters,)] if index > 0 else []  # lrelu(dnn_conv(X, w)): no BN
        channels = filters
    return {"gen": gen, "discrim": discrim + [(16 * channels, 1)]}


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


def check_shapes(network: str, kind: str, params: list[np.ndarray]) -> None:
    expected = param_shapes(network)[kind]
    given = [tuple(p.shape) for p in params]
    if given != expected:
        raise ValueError(f"{kind} arrays {given} are not the authors' {network} network's {expected}")


def generator(network: str, params: list[np.ndarray], z: np.ndarray, stats: list[tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """gen(Z, w, g, b, w2, g2, b2, ..., wx) of NETWORKS[network]; `stats` = (u, s) per
    BatchNorm (else batch statistics)."""
    spec = NETWORKS[network]
    check_shapes(network, "gen", params)
    given = iter(stats or [])
    Z = pt.matrix("Z")
    w, g, b, *rest = params
    h = relu(batchnorm(pt.dot(Z, w), g, b, *next(given, (None, None))))
    side, channels = 4, spec.projection
    h = h.reshape((len(z), channels, side, side))
    for filters, stride, border in spec.gen:
        h = deconv(h, rest.pop(0), (len(z), channels, side, side), stride, border)
        side, channels = side * stride, filters
        h = relu(batchnorm(h, rest.pop(0), rest.pop(0), *next(given, (None, None)))) if rest else pt.tanh(h)
    return pytensor.function([Z], h, mode=UNOPTIMISED)(z.astype(np.float64))


def discriminator(network: str, params: list[np.ndarray], x: np.ndarray, stats: list[tuple[np.ndarray, np.ndarray]] | None = None
                  ) -> tuple[list[np.ndarray], np.ndarray]:
    """discrim(X, w, w2, g2, b2, ..., wy) of NETWORKS[network] before its sigmoid: (each conv
    block's output, logits)."""
    spec = NETWORKS[network]
    check_shapes(network, "discrim", params)
    given = iter(stats or [])
    X = pt.tensor4("X")
    rest = list(params)
    h, side, channels, blocks = X, x.shape[-1], 3, []
    for index, (filters, stride, border) in enumerate(spec.discrim):
        h = conv(h, rest.pop(0), (len(x), channels, side, side), stride, border)
        if index > 0:
            h = batchnorm(h, rest.pop(0), rest.pop(0), *next(given, (None, None)))
        h = lrelu(h)
        blocks.append(h)
        side, channels = (side + 2 * border - spec.kernel) // stride + 1, filters
    logits = pt.dot(h.flatten(2), rest.pop(0))
    outputs = pytensor.function([X], [*blocks, logits], mode=UNOPTIMISED)(x.astype(np.float64))
    return outputs[:-1], outputs[-1][:, 0]
