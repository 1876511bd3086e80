"""Batched per-image statistics behind macenko_gpu's stain estimates: every function takes a chunk of b images
at once and never synchronizes with the host (no .item(), no data-dependent shapes), on CPU or CUDA.

optical densities by a 256-entry table, tissue mean and covariance, closed-form 3x3 eigenvectors and 2x2 inverses
(no LAPACK), nearest-rank percentiles of each image's own masked pixels by one selection per chunk (torchstain's
definition; no torch.quantile and its 2^24-element limit), and the fused reconstruction to 8-bit levels.
No command line: used by macenko_gpu.py.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

MAX_CONC_PERCENTILE = 99  # HEnorm/torchstain: a stain's maximum concentration is its 99th percentile


def od_table(io, beta):
    """OD of each 8-bit level, and the highest level whose OD is still >= beta (tissue)."""
    lut = -torch.log((torch.arange(256, dtype=torch.float32) + 1) / io)  # torchstain's float32 expression
    tissue_level = int((lut >= beta).sum()) - 1  # lut decreases: levels 0..tissue_level have OD >= beta
    return lut, tissue_level


def tissue_mean_and_cov(od, tissue, count):
    """Mean tissue OD (b, 3) and covariance (b, 3, 3) with divisor n-1 like torchstain, in float64."""
    weight = tissue.to(od.dtype)
    n = count.clamp(min=2).to(torch.float64)
    mean = torch.bmm(od, weight[:, :, None]).squeeze(-1).double() / n[:, None]
    centered = (od - mean.float()[:, :, None]) * weight[:, None, :]  # centre first: float32 sums stay accurate
    cov = torch.bmm(centered, centered.transpose(1, 2)).double() / (n - 1)[:, None, None]
    return mean, cov


def smallest_eigenvector(cov):
    """Unit eigenvector of the smallest eigenvalue of symmetric 3x3 matrices (closed form: trigonometric
    eigenvalues, then the longest cross product of two rows of cov - lambda_min * I). Zero vector if cov = c*I."""
    eye = torch.eye(3, dtype=cov.dtype, device=cov.device)
    q = cov.diagonal(dim1=1, dim2=2).mean(-1)
    off = cov[:, 0, 1] ** 2 + cov[:, 0, 2] ** 2 + cov[:, 1, 2] ** 2
    p = torch.sqrt(((cov.diagonal(dim1=1, dim2=2) - q[:, None]) ** 2).sum(-1) / 6 + off / 3)
    shifted = (cov - q[:, None, None] * eye) / torch.where(p > 0, p, 1.0)[:, None, None]
    det = (shifted[:, 0] * torch.linalg.cross(shifted[:, 1], shifted[:, 2])).sum(-1)
    angle = torch.acos((det / 2).clamp(-1, 1)) / 3
    lam_min = q + 2 * p * torch.cos(angle + 2 * math.pi / 3)
    rows = cov - lam_min[:, None, None] * eye
    cand = torch.stack((torch.linalg.cross(rows[:, 0], rows[:, 1]), torch.linalg.cross(rows[:, 0], rows[:, 2]),
                        torch.linalg.cross(rows[:, 1], rows[:, 2])), 1)
    norms = cand.norm(dim=-1)
    best = torch.take_along_dim(cand, norms.argmax(-1)[:, None, None], dim=1).squeeze(1)
    return best / norms.amax(-1).clamp(min=1e-300)[:, None]


def angle_basis(mean, cov):
    """(b, 2, 3) orthonormal basis of the top-2 eigenvector plane with u0 along the mean OD projected into it,
    so tissue angles cluster around 0 and the +-pi cut of atan2 lies opposite the tissue."""
    normal = smallest_eigenvector(cov)
    u0 = mean - (mean * normal).sum(-1, keepdim=True) * normal
    u0 = u0 / u0.norm(dim=-1, keepdim=True).clamp(min=1e-300)
    u1 = torch.linalg.cross(normal, u0)
    return torch.stack((u0, u1), 1)


def nearest_rank(q, n):
    """torchstain's percentile: the k-th smallest (1-based), k = 1 + round(q/100 * (n-1)) rounded half to even,
    for a tensor, an int or a numpy array of counts n."""
    if isinstance(n, torch.Tensor):
        return 1 + torch.round(0.01 * float(q) * (n.to(torch.float64) - 1)).long()
    return 1 + np.round(0.01 * float(q) * (np.asarray(n, dtype=np.float64) - 1)).astype(np.int64)


def kth_smallest(rows, k):
    """k-th smallest (1-based, same k for every row) of each row of a 2-D tensor. On CPU numpy's introselect is
    ~4x faster than torch.kthvalue/topk, which track indices; elsewhere torch.kthvalue, which never syncs."""
    if rows.device.type == "cpu":
        return torch.from_numpy(np.partition(rows.numpy(), k - 1, axis=-1)[:, k - 1])
    return rows.kthvalue(k, dim=-1).values


def tissue_percentiles(phi, tissue, count, alpha, high=True):
    """torchstain's alpha and 100-alpha percentiles of each image's tissue angles, with a single selection for
    the whole chunk. Row i wants its k_i-th smallest tissue angle: non-tissue angles become +inf and K - k_i
    padding entries of -inf are appended, so the K-th smallest of every padded row is the answer for a common K.
    The high percentile is the j_i-th smallest of -phi, j_i = n_i - k_hi + 1, padded the same way. high=False:
    the alpha percentile alone (half the rows)."""
    b, pixels = phi.shape
    k_lo, j_hi = nearest_rank(alpha, count), count - nearest_rank(100 - alpha, count) + 1
    k_max = max(int(nearest_rank(alpha, pixels)), max_high_rank(pixels, alpha) if high else 1)  # host ints: no sync
    rows = torch.empty(((1 + high) * b, pixels + k_max), dtype=phi.dtype, device=phi.device)
    inf = torch.full((), math.inf, dtype=phi.dtype, device=phi.device)  # a fill, not a host-to-device copy
    torch.where(tissue, phi, inf, out=rows[:b, :pixels])
    if high:
        torch.where(tissue, -phi, inf, out=rows[b:, :pixels])
    want = (torch.cat((k_lo, j_hi)) if high else k_lo).clamp(1, k_max)
    pad = torch.arange(k_max, device=phi.device)[None, :] < (k_max - want)[:, None]
    rows[:, pixels:] = torch.where(pad, -math.inf, math.inf)
    picked = kth_smallest(rows, k_max).to(phi.device, torch.float64)
    return (picked[:b], -picked[b:]) if high else picked


@lru_cache(maxsize=64)
def max_high_rank(pixels, alpha):
    """Largest j = n - k_hi(n) + 1 over every possible tissue count n <= pixels (the high side's padding size)."""
    n = np.arange(1, pixels + 1)
    return int((n - nearest_rank(100 - alpha, n) + 1).max())


def unit_in_plane(u, phi):
    return torch.cos(phi)[:, None] * u[:, 0] + torch.sin(phi)[:, None] * u[:, 1]


def pinv(matrix):
    """Least-squares inverse (b, 2, 3) of (b, 3, 2) stain matrices, as torch.linalg.lstsq solves it."""
    gram = matrix.transpose(1, 2) @ matrix
    det = gram[:, 0, 0] * gram[:, 1, 1] - gram[:, 0, 1] * gram[:, 1, 0]
    invertible = det > 1e-9 * gram[:, 0, 0] * gram[:, 1, 1]  # vectors more than ~0.002 deg apart
    safe = torch.where(invertible, det, 1.0)
    adj = torch.stack((torch.stack((gram[:, 1, 1], -gram[:, 0, 1]), -1),
                       torch.stack((-gram[:, 1, 0], gram[:, 0, 0]), -1)), 1)
    return (adj / safe[:, None, None]) @ matrix.transpose(1, 2), invertible


def reconstruct(od, od_to_output, io, out):
    """out = floor(min(Io * exp(-M @ OD), 255)) / 255: torchstain's clip and int truncation, as level/255."""
    torch.bmm(-od_to_output, od, out=out)
    out.add_(math.log(io)).exp_().clamp_(max=255.0).floor_().div_(255.0)


def max_concentrations(conc):
    """torchstain's 99th nearest-rank percentile of each stain over all pixels: (b, 2, N) -> (b, 2)."""
    b, stains, pixels = conc.shape
    k = int(nearest_rank(MAX_CONC_PERCENTILE, pixels))
    return kth_smallest(conc.reshape(b * stains, pixels), k).to(conc.device).view(b, stains)
