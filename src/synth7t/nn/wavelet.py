"""One-level 2-D Haar wavelet transform in torch (thesis 5.2: wavelet inputs, after Qu et al.'s WATNet).

:func:`haar_dwt2` splits each channel of a (B, C, H, W) map into four sub-bands at half resolution, (B, 4C, H/2,
W/2), ordered per input channel as LL, LH, HL, HH; :func:`haar_idwt2` inverts it exactly. The filters are the
orthonormal Haar pair (low ``[1, 1] / sqrt(2)``, high ``[1, -1] / sqrt(2)``) applied along rows and columns, so on
each 2x2 block ``[[a, b], [c, d]]``::

    LL = (a + b + c + d) / 2    LH = (a + b - c - d) / 2    (low across columns, high across rows)
    HL = (a - b + c - d) / 2    HH = (a - b - c + d) / 2    (high across columns; high across both)

The transform is a 4x4 orthogonal matrix on each block: it keeps the energy (sum of squares) and its inverse is
its transpose. Computed with strided slicing and additions (no convolution weights, no buffers): nothing goes
into a model's state dict, it runs on any device and dtype (bf16 autocast included) and has a gradient.
"""

from __future__ import annotations

import torch

__all__ = ["haar_dwt2", "haar_idwt2"]


def haar_dwt2(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) with even H, W -> (B, 4C, H/2, W/2): per channel c, sub-bands 4c..4c+3 = LL, LH, HL, HH."""
    if x.ndim != 4 or x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(f"haar_dwt2 needs a (B, C, H, W) tensor with even H and W, got {tuple(x.shape)}")
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    s, t = a + b, c + d  # low-pass across columns, top and bottom rows
    u, v = a - b, c - d  # high-pass across columns
    bands = torch.stack(((s + t) / 2, (s - t) / 2, (u + v) / 2, (u - v) / 2), dim=2)  # (B, C, 4, H/2, W/2)
    return bands.flatten(1, 2)


def haar_idwt2(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`haar_dwt2`: (B, 4C, H/2, W/2) -> (B, C, H, W)."""
    if y.ndim != 4 or y.shape[1] % 4:
        raise ValueError(f"haar_idwt2 needs a (B, 4C, h, w) tensor, got {tuple(y.shape)}")
    n, c4, h, w = y.shape
    ll, lh, hl, hh = y.reshape(n, c4 // 4, 4, h, w).unbind(2)
    s, t = ll + lh, ll - lh  # = (a + b), (c + d)
    u, v = hl + hh, hl - hh  # = (a - b), (c - d)
    out = y.new_empty(n, c4 // 4, 2 * h, 2 * w)
    out[..., 0::2, 0::2] = (s + u) / 2
    out[..., 0::2, 1::2] = (s - u) / 2
    out[..., 1::2, 0::2] = (t + v) / 2
    out[..., 1::2, 1::2] = (t - v) / 2
    return out
