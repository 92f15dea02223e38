"""Invertible linear operators A for zero-shot editing (Song et al. 2023, Algorithm 4).

An operator maps a batch ``x`` of shape (N, *shape) to A x of the same shape and back. Editing keeps
the reference's values of A y where the mask is 0 and the model's where it is 1, so an operator's
job is to put "what we know" into coordinates of its own. Write your own by subclassing
`LinearOperator` (``forward`` and ``inverse``); `check_invertible` tests any operator numerically.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

# ITU-R BT.601 luma weights, the paper's colorization choice.
LUMA = (0.2989, 0.5870, 0.1140)


class LinearOperator(ABC):
    """A x and A^-1 x on batches; subclasses implement both."""

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A x."""

    @abstractmethod
    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """A^-1 y."""


class Identity(LinearOperator):
    """A = I: the mask acts on the data itself (inpainting, SDEdit)."""

    def forward(self, x):
        return x

    def inverse(self, y):
        return y


def orthogonal_with_first_column(v: torch.Tensor) -> torch.Tensor:
    """An orthogonal matrix Q (float64) whose first column is v / |v|: QR of [v, I]."""
    v = torch.as_tensor(v, dtype=torch.float64).flatten()
    if not bool(torch.linalg.vector_norm(v) > 0):
        raise ValueError("the first column must be non-zero")
    n = len(v)
    q, r = torch.linalg.qr(torch.cat([v[:, None], torch.eye(n, dtype=torch.float64)], 1))
    q = q[:, :n] * torch.sign(r[0, 0])  # first column +v/|v|, not -v/|v|
    return q


def _check_orthogonal(q: torch.Tensor, what: str) -> None:
    eye = torch.eye(q.shape[0], dtype=torch.float64)
    if q.ndim != 2 or q.shape[0] != q.shape[1] or not torch.allclose(q.double().T @ q.double(), eye, atol=1e-6):
        raise ValueError(f"{what} must be a square orthogonal matrix")


class ChannelMix(LinearOperator):
    """A acts on the channel vector of each pixel: (A x)[:, k] = sum_c Q[c, k] x[:, c] (A = Q^T per
    pixel). With Q's first column proportional to the luma weights, channel 0 of A x is the
    luminance up to the constant |w|: `ChannelMix.colorization()`."""

    def __init__(self, q: torch.Tensor):
        q = torch.as_tensor(q, dtype=torch.float64)
        _check_orthogonal(q, "a channel-mixing matrix")
        self.q = q

    @classmethod
    def colorization(cls) -> "ChannelMix":
        return cls(orthogonal_with_first_column(torch.tensor(LUMA)))

    def _apply(self, m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != m.shape[0]:
            raise ValueError(f"expected a batch of {m.shape[0]}-channel images, got shape {tuple(x.shape)}")
        return torch.einsum("ck,nchw->nkhw", m.to(x), x)

    def forward(self, x):
        return self._apply(self.q, x)

    def inverse(self, y):
        return self._apply(self.q.T, y)


class PatchOrthogonal(LinearOperator):
    """A acts on each non-overlapping p x p patch of each channel: the patch's p^2 pixels (row-major)
    are mapped by Q^T, and the coefficients are stored as a (p^2)-channel grid of the low-resolution
    positions, folded back into the image's shape: coefficient k of the patch at (i, j) lands at
    pixel (i p + k // p, j p + k % p). With Q's first column constant, coefficient 0 is p times the
    patch mean: `PatchOrthogonal.superresolution(p)`."""

    def __init__(self, q: torch.Tensor, patch: int):
        q = torch.as_tensor(q, dtype=torch.float64)
        if patch < 1 or q.shape[0] != patch * patch:
            raise ValueError(f"a {patch}x{patch} patch needs a {patch * patch}x{patch * patch} matrix")
        _check_orthogonal(q, "a patch matrix")
        self.q, self.p = q, patch

    @classmethod
    def superresolution(cls, patch: int) -> "PatchOrthogonal":
        if not 2 <= patch <= 16:
            raise ValueError(f"the super-resolution factor must be in 2..16, got {patch}")
        return cls(orthogonal_with_first_column(torch.ones(patch * patch)), patch)

    def _patches(self, x):
        n, c, h, w = x.shape
        p = self.p
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
        # (n, c, h/p, p, w/p, p) -> (n, c, h/p, w/p, p*p)
        return x.reshape(n, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h // p, w // p, p * p)

    def _unpatches(self, v, shape):
        n, c, h, w = shape
        p = self.p
        return v.reshape(n, c, h // p, w // p, p, p).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)

    def forward(self, x):
        if x.ndim != 4:
            raise ValueError(f"expected a batch of images (N, C, H, W), got shape {tuple(x.shape)}")
        return self._unpatches(self._patches(x) @ self.q.to(x), x.shape)

    def inverse(self, y):
        if y.ndim != 4:
            raise ValueError(f"expected a batch of images (N, C, H, W), got shape {tuple(y.shape)}")
        return self._unpatches(self._patches(y) @ self.q.T.to(y), y.shape)

    def coefficient_mask(self, shape, keep: int = 1) -> torch.Tensor:
        """The A-space mask (1 = the model's) that keeps the reference's first ``keep`` coefficients
        of every patch (keep = 1: the patch means)."""
        n, c, h, w = shape
        v = torch.ones(1, 1, h // self.p, w // self.p, self.p * self.p)
        v[..., :keep] = 0
        return self._unpatches(v.expand(1, c, -1, -1, -1), (1, c, h, w))


def check_invertible(op: LinearOperator, shape: tuple[int, ...], atol: float = 1e-4) -> None:
    """Raise ValueError unless A^-1 A x = x and A A^-1 x = x on random batches of ``shape``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *shape, generator=g, dtype=torch.float64)
    for name, y in (("A^-1 A", op.inverse(op.forward(x))), ("A A^-1", op.forward(op.inverse(x)))):
        if y.shape != x.shape or not torch.allclose(y, x, atol=atol):
            raise ValueError(f"{type(op).__name__} is not invertible on shape {shape}: {name} x != x")
