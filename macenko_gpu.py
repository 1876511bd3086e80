"""Batched IHC stain normalization (hematoxylin + DAB): one vectorised pass over a whole batch, on CPU or CUDA.

In code (what training and evaluation do):
    norm = MacenkoNormalizer().fit(load_rgb("ref.png")).to("cuda")
    x = norm.normalize(batch)      # uint8 (B,3,H,W) -> float32 (B,3,H,W) in [0,1] on batch's device
    ckpt["stain"] = norm.state_dict()      # plain tensors and scalars: weights_only-safe (common.checkpoint)
    norm = MacenkoNormalizer.from_state_dict(torch.load(path, weights_only=True)["stain"])

Modes (mode=..., stored in the state; every mode is one batched pass, no per-image Python loop, no host sync):
  * "ihc" (default): what an IHC patch can determine. DAB's color is fixed by its chemistry, so the DAB vector
    is the reference's (fit: from the reference's own DAB pixels, those >= 0.15 OD off its hematoxylin axis);
    the hematoxylin vector is estimated per patch (in the plane of DAB and the patch's mean OD, Macenko's
    alpha-percentile angle away from DAB over all but the palest 25% of tissue); concentrations by least squares
    on that pair; hematoxylin scaled to the reference's 99th percentile as Macenko does; DAB multiplied by ONE
    fixed factor (dab_scale = 1: its optical density is kept), since the amount of DAB is the biological signal.
    A few rods cannot tilt a per-patch DAB vector that is no longer estimated, and no DAB-free patch has its
    noise rescaled to the reference's brown. Per patch, not per slide: what is left to estimate (hematoxylin's
    direction and 99th percentile) is set by the thousands of hematoxylin pixels of any tissue patch, and
    per-slide matrices would need slide ids and a pre-pass through the data path.
  * "macenko": canonical HEnorm/torchstain Macenko on every patch (matches torchstain within 2 gray levels on
    tissue-rich tiles). On IHC it paints DAB-free nuclei brown and, with a sparse-DAB reference, loses bacteria.
  * "auto": the previous default (single-stain tiles keep one stain), kept only so checkpoints trained with it
    normalize as they were trained; it turns sparse rods blue (projected onto hematoxylin). Not for new runs.
States written before the modes existed (single_stain="auto"/"off") load as "auto"/"macenko".
The command line (a folder, --preview mosaics, the torchstain benchmark) is stain.py; python tools/stain_check.py prints
bacteria AUROC / brown-nuclei numbers of every mode on synthetic IHC patches.

The reference must define DAB: fit() raises a one-line ValueError for one with under 100 tissue pixels, under
0.2% of its tissue on DAB, or hematoxylin and DAB vectors < 30 degrees apart (diffuse DAB on its nuclei: its
hematoxylin would tint every patch brown). A good reference: a tissue-rich tile with blue DAB-free nuclei and
clear brown DAB (a few bacteria or other DAB-positive structures).

Shared batched machinery: OD = -ln((I+1)/Io) (a 256-entry table); tissue = no channel's OD below beta (an integer
threshold on the uint8 image); percentiles of each image's own tissue by one masked selection per chunk;
closed-form 3x3 eigenvectors and 2x2 inverses (no LAPACK, no CUDA sync); output Io*exp(-M @ OD) with one fused
3x3 M per image, truncated to 8-bit levels like torchstain (so it equals an offline-normalized PNG). A tile with
< min_tissue_pixels tissue pixels (100, as in the original pipeline) or a degenerate estimate is rebuilt with the
reference stain matrix, unscaled (torchstain raises "kthvalue(): Expected reduction dim 0 to have non-zero
size"); no tile changes its neighbors' statistics. Macenko's angles are measured from the tile's mean OD
direction, not an eigenvector of arbitrary sign (torchstain's wrap around +-pi gives garbage there).

Memory: chunks of chunk_pixels pixels (2^20 on CPU: cache-sized, few parallel regions; 2^24 on CUDA), ~60 bytes
of working memory per pixel of a chunk (~60 MB on CPU, ~1 GB on CUDA; ~4 MB per 256x256 image) plus the float32
output (12 bytes per pixel). No torch.quantile (2^24-element limit): any batch size works (tested: 512 x 256x256).

"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common

MAX_CONC_PERCENTILE = 99  # HEnorm/torchstain: a stain's maximum concentration is its 99th percentile
CPU_CHUNK_PIXELS = 2 ** 20  # ~20 tiles of 224x224: OD (12 MB) stays below glibc's mmap threshold, few parallel regions
CUDA_CHUNK_PIXELS = 2 ** 24  # large enough to fill a GPU, small enough to cap working memory near 1 GB
FALLBACK, SINGLE_STAIN, TWO_STAINS = 0, 1, 2  # per-image mode reported by analyze()
MODES = ("ihc", "macenko", "auto")  # default first; see the module docstring
# The stain reference must define DAB: this share of its tissue pixels lie REFERENCE_DAB_OD or more (natural-log
# OD) off its hematoxylin axis - the demo reference has 0.5%, a bacterium ~0.7, a bacteria-free tile 0.
REFERENCE_DAB_OD, REFERENCE_DAB_SHARE = 0.15, 0.002
MIN_DAB_ANGLE = 10.0  # reference pixels this far off its hematoxylin count as DAB (dark nuclei stray ~3)
MIN_STAIN_ANGLE = 30.0  # degrees between the reference's hematoxylin and DAB (Ruifrok's vectors: 37)
PALE_PERCENTILE = 25  # ihc: hematoxylin's angle ignores this palest share of tissue pixels (OD summed over RGB)
MIN_HEMATOXYLIN_ANGLE = 10.0  # ihc: a patch whose hematoxylin estimate lies closer to DAB is nearly all DAB
GOOD_REFERENCE = ("a good reference is a tissue-rich tile whose DAB-free nuclei are blue and that shows clear brown "
                  "DAB (a few bacteria or other DAB-positive structures, >= 0.2% of its tissue)")
SETTINGS = ("mode", "io", "alpha", "beta", "dab_scale", "single_stain_angle", "stain_presence", "min_tissue_pixels")


def ieee_fp32(method):
    """Run `method` with CUDA float32 matmuls in full IEEE precision, whatever the caller allowed: train.py allows
    TF32 for the network, and TF32 in Macenko's bmm moved ~1% of output values by one gray level, so train.py's
    normalized patches differed from evaluate.py's and patch_cache.py's (a cache's bytes depended on which script
    built it). PyTorch's newer fp32_precision API only: mixing it with allow_tf32 raises."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        matmul = torch.backends.cuda.matmul
        before, matmul.fp32_precision = matmul.fp32_precision, "ieee"
        try:
            return method(*args, **kwargs)
        finally:
            matmul.fp32_precision = before
    return wrapper


class MacenkoNormalizer:
    """Stain normalizer fitted to one reference image, applied to whole uint8 batches on any device."""

    def __init__(self, mode="ihc", io=240, alpha=1, beta=0.15, dab_scale=1.0, single_stain_angle=15.0,
                 stain_presence=0.2, min_tissue_pixels=100, chunk_pixels=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not (0 < io <= 255 and 0 <= alpha < 50 and beta >= 0 and min_tissue_pixels >= 2 and dab_scale > 0):
            raise ValueError("need 0 < io <= 255, 0 <= alpha < 50, beta >= 0, min_tissue_pixels >= 2, dab_scale > 0")
        self.mode, self.io, self.alpha, self.beta, self.dab_scale = mode, io, alpha, beta, float(dab_scale)
        self.single_stain_angle, self.stain_presence = float(single_stain_angle), float(stain_presence)
        self.min_tissue_pixels, self.chunk_pixels = int(min_tissue_pixels), chunk_pixels
        self.stain_matrix = None  # (3, 2): columns are unit OD vectors, hematoxylin first (larger red OD)
        self.max_concentrations = None  # (2,): reference 99th-percentile concentration of each stain
        self.device, self._cache = torch.device("cpu"), {}  # _cache: per-device constants, see _constants()

    @property
    def fitted(self) -> bool:
        return self.stain_matrix is not None

    @torch.no_grad()
    @ieee_fp32
    def fit(self, reference) -> "MacenkoNormalizer":
        """Estimate the reference stain matrix and maxima from one uint8 (3, H, W) image, or from several (a list
        of them, sizes may differ, or a (N, 3, H, W) batch) whose pixels are pooled as one image: the DAB vector
        then rests on every reference's DAB pixels, not one patch's few. Returns self. Raises ValueError (one
        line) for a reference that cannot define both stains."""
        x = _pooled(reference, "reference").to(self.device)
        od, count, mean, two, _, _ = self._two_stain_estimate(x)  # canonical Macenko (torchstain's fit)
        tissue = x.amax(dim=1) <= self._constants(x.device)["tissue_level"]
        dab, _, share = (v[0] for v in _dab_vectors(od, tissue, two[:, :, 0], self.alpha))
        share = float(share)
        if self.mode == "ihc":  # canonical hematoxylin, DAB from the reference's DAB pixels alone
            two = torch.stack((two[:, :, 0], dab[None]), -1)
        pinv, invertible = pseudo_inverse(two)
        _check_reference(int(count[0]), self.min_tissue_pixels, bool(invertible[0]), two[0], share)
        max_conc = max_concentrations(torch.bmm(pinv.float(), od))[0]
        if not (max_conc > 0).all():
            raise ValueError(f"reference image is unusable: a stain has no positive concentration; {GOOD_REFERENCE}")
        self.stain_matrix, self.max_concentrations, self._cache = two[0].float(), max_conc.float(), {}
        return self

    @torch.no_grad()
    @ieee_fp32
    def dab_angles(self, groups) -> list:
        """For each group of uint8 (3, H, W) images (e.g. a slide's patches), the angle in degrees between the DAB
        vector fit() would take from their pooled pixels and this normalizer's; None where they show too little DAB
        to define one (under min_tissue_pixels DAB pixels or REFERENCE_DAB_SHARE of their tissue). The ihc mode
        keeps the reference's DAB vector on every patch, so a slide whose DAB hue differs has its DAB amount
        changed (10 degrees: rods x0.83 to x1.26). Groups are padded with white, which is not tissue."""
        dab, out = self._reference()[0][:, 1].double(), []
        budget = self.chunk_pixels or (CPU_CHUNK_PIXELS if self.device.type == "cpu" else CUDA_CHUNK_PIXELS)
        white = torch.full((1, 3, 1), 255, dtype=torch.uint8)  # an empty group: no tissue, so None
        pooled = [_pooled(g, "slide images") if len(g) else white for g in groups]
        lo = 0
        while lo < len(pooled):  # chunks of groups: at least one, else up to the chunk's pixel budget
            hi = lo + 1
            while hi < len(pooled) and sum(p.shape[-1] for p in pooled[lo:hi + 1]) <= budget:
                hi += 1
            width = max(p.shape[-1] for p in pooled[lo:hi])
            x = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[-1]), value=255) for p in pooled[lo:hi]])
            x = x.to(self.device)
            od, count, _, two, _, _ = self._two_stain_estimate(x)
            tissue = x.amax(dim=1) <= self._constants(x.device)["tissue_level"]
            vectors, n, share = _dab_vectors(od, tissue, two[:, :, 0], self.alpha)
            angles = torch.rad2deg(torch.acos((vectors.double() @ dab.to(vectors.device)).clamp(-1, 1)))
            ok = (n >= self.min_tissue_pixels) & (share >= REFERENCE_DAB_SHARE) & (count >= self.min_tissue_pixels)
            out += [float(a) if k else None for a, k in zip(angles.cpu(), ok.cpu())]
            lo = hi
        return out

    @torch.no_grad()
    @ieee_fp32
    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) on any device -> float32 (B, 3, H, W) in [0, 1] (level/255) on the same device."""
        b, _, h, w = _check_uint8(batch, ndim=4, what="batch").shape
        out = torch.empty((b, 3, h * w), dtype=torch.float32, device=batch.device)
        for (lo, hi), est in self._estimates(batch):
            reconstruct(est["od"], est["od_to_output"], self.io, out[lo:hi])
        return out.view(b, 3, h, w)

    @torch.no_grad()
    @ieee_fp32
    def analyze(self, batch: torch.Tensor) -> dict:
        """Per-image diagnostics of normalize(): tissue_pixels, mode (0 fallback to the reference matrix, 1
        single-stain, 2 estimated), stain_matrix (B,3,2) and max_concentrations (B,2) as used; macenko/auto also
        angle_spread_deg and stains_present (B,2)."""
        parts = [est for _, est in self._estimates(_check_uint8(batch, ndim=4, what="batch"))]
        keys = [k for k, v in parts[0].items() if v is not None and k not in ("od", "od_to_output")]
        return {k: torch.cat([p[k] for p in parts]) for k in keys}

    def to(self, device) -> "MacenkoNormalizer":
        self.device = torch.device(device)
        if self.fitted:
            self.stain_matrix, self.max_concentrations = (t.to(self.device) for t in self._reference())
        return self

    def state_dict(self) -> dict:
        """Everything normalize() depends on, as CPU tensors and Python scalars (torch.load(weights_only=True))."""
        matrix, maxima = self._reference()
        return {**{k: getattr(self, k) for k in SETTINGS}, "stain_matrix": matrix.detach().cpu().clone(),
                "max_concentrations": maxima.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> "MacenkoNormalizer":
        state = dict(state)
        if "mode" not in state and state.get("single_stain") in ("auto", "off"):  # written before the ihc mode:
            state["mode"] = {"auto": "auto", "off": "macenko"}[state.pop("single_stain")]  # normalize as trained
            state.setdefault("dab_scale", 1.0)
        missing = {*SETTINGS, "stain_matrix", "max_concentrations"} - set(state)
        if missing:
            raise ValueError(f"stain reference state is missing {sorted(missing)}: not a MacenkoNormalizer state")
        matrix, maxima = torch.as_tensor(state["stain_matrix"]), torch.as_tensor(state["max_concentrations"])
        if matrix.shape != (3, 2) or maxima.shape != (2,):
            raise ValueError(f"stain reference state has shapes {tuple(matrix.shape)}, {tuple(maxima.shape)}; "
                             f"expected (3, 2) and (2,)")
        device = self.device
        self.__init__(**{k: state[k] for k in SETTINGS}, chunk_pixels=self.chunk_pixels)
        self.stain_matrix, self.max_concentrations = matrix.float(), maxima.float()
        return self.to(device)

    @classmethod
    def from_state_dict(cls, state: dict) -> "MacenkoNormalizer":
        return cls().load_state_dict(state)

    # ------------------------------------------------------------------------------------------- internals
    def _constants(self, device):
        """Lookup table and reference tensors on `device`, built once per device: a per-chunk host-to-device copy
        from pageable memory would make CUDA wait for the queued work (a hidden host sync)."""
        key = str(device)
        if key not in self._cache:
            lut, level = od_table(self.io, self.beta)
            const = {"lut": lut.to(device), "tissue_level": level}
            if self.fitted:
                ref = self.stain_matrix.to(device, torch.float64)
                ref_max = self.max_concentrations.to(device, torch.float64)
                const.update(ref=ref, ref_max=ref_max, ref_pinv=pseudo_inverse(ref[None])[0],
                             presence=(self.stain_presence * ref_max).float()[None, :, None])
            self._cache[key] = const
        return self._cache[key]

    def _reference(self):
        if not self.fitted:
            raise RuntimeError("MacenkoNormalizer is not fitted: call fit(reference) or load_state_dict() first")
        return self.stain_matrix, self.max_concentrations

    def _estimates(self, batch):
        """((lo, hi), estimate) for each chunk of images: the only loop, over chunks of many images."""
        self._reference()
        flat = batch.reshape(batch.shape[0], 3, -1)
        budget = self.chunk_pixels or (CUDA_CHUNK_PIXELS if batch.device.type == "cuda" else CPU_CHUNK_PIXELS)
        step = max(1, budget // max(flat.shape[-1], 1))
        estimate = self._ihc_chunk if self.mode == "ihc" else self._estimate_chunk
        for lo in range(0, len(flat), step):
            yield (lo, min(lo + step, len(flat))), estimate(flat[lo:lo + step])

    def _optical_density(self, x):
        """OD (b, 3, N) of a uint8 chunk (b, 3, N), its tissue mask (b, N) and tissue counts (b,)."""
        const = self._constants(x.device)
        od = const["lut"].index_select(0, x.reshape(-1).int()).view(x.shape)  # exact torchstain OD values, no log
        tissue = x.amax(dim=1) <= const["tissue_level"]  # no channel's OD below beta <=> every channel <= tissue_level
        return od, tissue, tissue.sum(dim=1)

    def _ihc_chunk(self, x):
        """The default: DAB vector of the reference, hematoxylin vector per patch, hematoxylin scaled to the
        reference's 99th percentile, DAB concentration times the fixed dab_scale (its amount is the signal)."""
        const = self._constants(x.device)
        ref, ref_max = const["ref"], const["ref_max"]
        od, tissue, count = self._optical_density(x)
        mean = torch.bmm(od, tissue.to(od.dtype)[:, :, None]).squeeze(-1).double() / count.clamp(min=1)[:, None]
        h, valid = _hematoxylin_vectors(od, tissue, count, mean, ref[:, 1], self.alpha)
        matrix = torch.stack((h, ref[:, 1].expand_as(h)), -1)
        pinv, invertible = pseudo_inverse(matrix)
        max_h = max_concentrations(torch.bmm(pinv[:, :1].float(), od))[:, 0].double()
        usable = (count >= self.min_tissue_pixels) & valid & invertible & (max_h > 1e-6 * ref_max[0])  # NaN: false
        pinv = torch.where(usable[:, None, None], pinv, const["ref_pinv"])
        matrix = torch.where(usable[:, None, None], matrix, ref)
        scale = torch.stack((torch.where(usable, ref_max[0] / max_h, 1.0), torch.full_like(max_h, self.dab_scale)), -1)
        od_to_output = ref @ (scale[:, :, None] * pinv)
        return {"od": od, "od_to_output": od_to_output.float(), "tissue_pixels": count,
                "mode": torch.where(usable, TWO_STAINS, FALLBACK), "stain_matrix": matrix,
                "max_concentrations": torch.stack((max_h, torch.full_like(max_h, math.nan)), -1)}

    def _two_stain_estimate(self, x, ref=None):
        """Canonical Macenko on a chunk x: uint8 (b, 3, N). Returns OD (b, 3, N), tissue counts, mean tissue OD,
        the two percentile stain vectors (b, 3, 2) with the larger red OD first, their angle apart in degrees and,
        given the reference stain matrix, which reference stains are present (b, 2)."""
        const = self._constants(x.device)
        od, tissue, count = self._optical_density(x)
        mean, cov = tissue_mean_and_cov(od, tissue, count)
        u = angle_basis(mean, cov)  # (b, 2, 3): in-plane unit vectors, u[:, 0] along the mean tissue OD
        maps = u if ref is None else torch.cat((u, const["ref_pinv"].expand(len(u), 2, 3)), 1)
        proj = torch.bmm(maps.float(), od)  # plane coordinates, then concentrations on the reference stains
        phi_lo, phi_hi = tissue_percentiles(torch.atan2(proj[:, 1], proj[:, 0]), tissue, count, self.alpha)
        v_lo, v_hi = unit_in_plane(u, phi_lo), unit_in_plane(u, phi_hi)
        two = torch.where((v_lo[:, 0] > v_hi[:, 0])[:, None, None], torch.stack((v_lo, v_hi), -1),
                          torch.stack((v_hi, v_lo), -1))
        present = None
        if ref is not None:  # 99th percentile >= presence * reference maximum, counted instead of selected
            at_or_above_p99 = x.shape[-1] - int(nearest_rank(MAX_CONC_PERCENTILE, x.shape[-1])) + 1
            present = (proj[:, 2:] >= const["presence"]).sum(-1) >= at_or_above_p99
        return od, count, mean, two, torch.rad2deg(phi_hi - phi_lo), present

    def _estimate_chunk(self, x):
        """Per-image stain estimate of a chunk; od_to_output is the fused (b, 3, 3) map from OD to output OD."""
        const = self._constants(x.device)
        ref = const["ref"]
        od, count, mean, two, spread, present = self._two_stain_estimate(x, ref)
        single = self._is_single_stain(two, spread, ref, present)
        matrix, slot = _stain_matrices(two, single, mean, ref)
        pinv, invertible = pseudo_inverse(matrix)
        max_conc = max_concentrations(torch.bmm(pinv.float(), od)).double()
        rescaled = torch.stack((~single | (slot == 0), ~single | (slot == 1)), -1)  # single: one stain only
        finite_scale = max_conc > 1e-6 * const["ref_max"]  # also false for NaN
        usable = (count >= self.min_tissue_pixels) & invertible & torch.where(rescaled, finite_scale, True).all(-1)
        mode = torch.where(usable, torch.where(single, SINGLE_STAIN, TWO_STAINS), FALLBACK)
        fallback = (mode == FALLBACK)[:, None]
        scale = torch.where(rescaled & ~fallback, const["ref_max"] / max_conc, 1.0)
        pinv = torch.where(fallback[:, :, None], const["ref_pinv"], pinv)
        matrix = torch.where(fallback[:, :, None], ref, matrix)
        od_to_output = ref @ (scale[:, :, None] * pinv)  # HERef @ diag(maxCRef / maxC) @ pinv(HE)
        return {"od": od, "mode": mode, "tissue_pixels": count, "angle_spread_deg": spread, "stain_matrix": matrix,
                "max_concentrations": max_conc, "stains_present": present, "od_to_output": od_to_output.float()}

    def _is_single_stain(self, two, spread, ref, present):
        """IHC safety: one stain when a reference stain is absent from the tile, when the angle percentiles lie
        close together, or when both percentile vectors are nearest the same reference stain."""
        if self.mode == "macenko":
            return torch.zeros_like(spread, dtype=torch.bool)
        nearest = (two.transpose(1, 2) @ ref).argmax(-1)  # (b, 2): index of the nearest reference stain
        return ~present.all(-1) | (spread < self.single_stain_angle) | (nearest[:, 0] == nearest[:, 1])


# ---------------------------------------------------------------------------------------------- batched statistics
# Every function takes a chunk of b images at once and never synchronizes with the host (no .item(), no
# data-dependent shapes), on CPU or CUDA.
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
    centered = (od - mean.float()[:, :, None]) * weight[:, None, :]  # center first: float32 sums stay accurate
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
    """k-th smallest (1-based, same k for every row) of each row of a 2-D tensor. On CPU numpy's introselect,
    faster than torch.kthvalue/topk, which track indices; elsewhere torch.kthvalue, which never syncs."""
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


@functools.lru_cache(maxsize=64)
def max_high_rank(pixels, alpha):
    """Largest j = n - k_hi(n) + 1 over every possible tissue count n <= pixels (the high side's padding size)."""
    n = np.arange(1, pixels + 1)
    return int((n - nearest_rank(100 - alpha, n) + 1).max())


def unit_in_plane(u, phi):
    return torch.cos(phi)[:, None] * u[:, 0] + torch.sin(phi)[:, None] * u[:, 1]


def pseudo_inverse(matrix):
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


# ---------------------------------------------------------------------------------------------- stain estimates
def _hematoxylin_vectors(od, tissue, count, mean, dab, alpha):
    """Per-image hematoxylin unit vector (b, 3) given the DAB vector (3,): in the plane of DAB and the tissue's
    mean OD, where every H + DAB mixture lies, hematoxylin is the direction farthest from DAB that the tissue
    reaches (its alpha-percentile angle, as Macenko's), over all but the palest PALE_PERCENTILE % of the tissue.
    Pale pixels lie up to 3 degrees beyond hematoxylin, away from DAB (Io = 240 < a white background's 255 shifts
    their OD), so Macenko's extreme would give every dark nucleus a little DAB. Sparse DAB (a few bacteria)
    cannot move the estimate; dense DAB moves it towards DAB (less DAB out, never more). valid: false where the
    mean OD is (nearly) DAB itself."""
    e = mean - (mean @ dab)[:, None] * dab
    norm = e.norm(dim=-1)
    u = torch.stack((e / norm.clamp(min=1e-300)[:, None], dab.expand_as(e)), 1)  # (b, 2, 3): DAB-free axis, DAB
    proj = torch.bmm(u.float(), od)
    darkness = od.sum(dim=1)
    cut = tissue_percentiles(darkness, tissue, count, PALE_PERCENTILE, high=False)  # no sync
    dark = tissue & (darkness >= cut.float()[:, None])
    phi = tissue_percentiles(torch.atan2(proj[:, 1], proj[:, 0]), dark, dark.sum(dim=1), alpha, high=False)
    h = unit_in_plane(u, phi)
    return h, (norm > 1e-3 * mean.norm(dim=-1)) & ((h @ dab) < math.cos(math.radians(MIN_HEMATOXYLIN_ANGLE)))


def _lengths(v):
    """Euclidean length of each pixel's (b, 3, N) vector: (b, N). Written out because torch's CPU norm(dim=1) over
    a size-3 axis strided by N is far slower (most of the stain survey's time); the two differ in
    the last bit on some pixels, which moves a pixel across a threshold only when it lies on it."""
    return (v[:, 0] * v[:, 0] + v[:, 1] * v[:, 1] + v[:, 2] * v[:, 2]).sqrt()


def _dab_vectors(od, tissue, hematoxylin, alpha):
    """DAB unit vectors (b, 3) of b images (od (b, 3, N), hematoxylin (b, 3)), their DAB pixel counts and the share
    of their tissue that shows DAB. DAB pixels are those at least REFERENCE_DAB_OD off the hematoxylin axis; in the
    plane of hematoxylin and their mean offset, DAB is their 100-alpha percentile angle. Canonical Macenko takes
    that percentile over all tissue, which is noise when DAB covers under ~1% of it (a reference with a few
    bacteria)."""
    h = hematoxylin.float()
    offset = od - h[:, :, None] * torch.bmm(h[:, None], od)
    off = _lengths(offset)  # DAB pixels: far enough off hematoxylin, and not just a dark nucleus a bit off it
    dab_pixels = tissue & (off >= REFERENCE_DAB_OD) & (off >= math.sin(math.radians(MIN_DAB_ANGLE)) * _lengths(od))
    n = dab_pixels.sum(dim=1)
    axis = (offset * dab_pixels[:, None]).sum(-1).double()
    u = torch.stack((hematoxylin.double(), axis / axis.norm(dim=-1, keepdim=True).clamp(min=1e-300)), 1)  # (b, 2, 3)
    proj = torch.bmm(u.float(), od)
    _, phi = tissue_percentiles(torch.atan2(proj[:, 1], proj[:, 0]), dab_pixels, n.clamp(min=1), alpha)
    return unit_in_plane(u, phi), n, n.double() / tissue.sum(dim=1).clamp(min=1).double()


def _check_reference(tissue_pixels, min_tissue_pixels, invertible, two, dab_share):
    """One-line ValueError unless the reference defines both stains: enough tissue, DAB vector apart from
    hematoxylin, and enough DAB pixels to define the DAB vector."""
    if tissue_pixels < min_tissue_pixels:
        raise ValueError(f"reference image is unusable: {tissue_pixels} tissue pixels (need >= {min_tissue_pixels});"
                         f" {GOOD_REFERENCE}")
    if dab_share < REFERENCE_DAB_SHARE or not invertible:
        raise ValueError(f"reference has too little DAB to define a DAB direction ({100 * dab_share:.2f}% of its "
                         f"tissue >= {REFERENCE_DAB_OD} OD off hematoxylin, need {100 * REFERENCE_DAB_SHARE:.1f}%); "
                         f"{GOOD_REFERENCE}")
    angle = math.degrees(math.acos(min(1.0, float(two[:, 0] @ two[:, 1]))))
    if angle < MIN_STAIN_ANGLE:
        raise ValueError(f"reference's hematoxylin and DAB vectors are only {angle:.0f} degrees apart (need >= "
                         f"{MIN_STAIN_ANGLE:.0f}): too little DAB for this mode's estimate, or DAB on its nuclei "
                         f"(which would tint every patch brown); {GOOD_REFERENCE}")


def _stain_matrices(two, single, mean, ref):
    """Per-image stain matrix (b, 3, 2): the two percentile vectors, or for single-stain tiles the mean OD direction
    in the slot of the nearer reference stain and the reference's other vector in the other slot."""
    dominant = mean / mean.norm(dim=-1, keepdim=True).clamp(min=1e-300)
    slot = (dominant @ ref).argmax(-1)
    ref = ref.expand(two.shape[0], 3, 2)
    one = torch.where((slot == 0)[:, None, None], torch.stack((dominant, ref[:, :, 1]), -1),
                      torch.stack((ref[:, :, 0], dominant), -1))
    return torch.where(single[:, None, None], one, two), slot


# ---------------------------------------------------------------------------------------------- inputs
def _pooled(images, what) -> torch.Tensor:
    """One uint8 (3, H, W) image, a list of them or a (N, 3, H, W) batch -> their pixels as one (1, 3, P) image."""
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        images = list(_check_uint8(images, ndim=4, what=what))
    images = images if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ValueError(f"{what}: no images")
    return torch.cat([_check_uint8(x, ndim=3, what=what).reshape(3, -1) for x in images], 1)[None]


def _check_uint8(x, ndim, what):
    shape = "(B, 3, H, W)" if ndim == 4 else "(3, H, W)"
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != ndim or x.shape[-3] != 3:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a uint8 tensor of shape {shape}, got {got}")
    return x


def load_rgb(path) -> torch.Tensor:
    """PNG/JPEG/TIFF -> uint8 (3, H, W) RGB tensor. Transparency is composited onto white (background, not
    tissue); gray images are replicated to three channels. Raises ValueError naming the file if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                white = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, image.convert("RGBA"))
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def synthetic_ihc_tiles(count, size=224, seed=0, dab=True) -> torch.Tensor:
    """Beer-Lambert IHC-like tiles, uint8 (count, 3, size, size): smooth hematoxylin tissue with white gaps and,
    if dab, brown DAB spots, mixed with the known STAIN_OD matrix plus sensor noise. Benchmark and test input."""
    gen = torch.Generator().manual_seed(seed)

    def smooth_field(cells):  # values in [0, 1] varying over `cells` blobs per side
        low = torch.rand((count, 1, cells + 1, cells + 1), generator=gen)
        return torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=True)[:, 0]

    hematoxylin = 2.0 * (smooth_field(4) - 0.1).clamp(min=0) * (0.5 + 0.5 * smooth_field(16))  # ~10% white gaps
    conc = [hematoxylin, 3.0 * (smooth_field(12) - 0.6).clamp(min=0) if dab else torch.zeros_like(hematoxylin)]
    od = torch.einsum("cs,sbhw->bchw", STAIN_OD, torch.stack(conc))
    light = 245 * torch.exp(-od) + 2.0 * torch.randn(od.shape, generator=gen)
    return light.round().clamp(0, 255).to(torch.uint8)


# Ruifrok & Johnston optical-density vectors (rows R, G, B), unit columns: hematoxylin, DAB.
STAIN_OD = torch.nn.functional.normalize(torch.tensor([[0.650, 0.268], [0.704, 0.570], [0.286, 0.776]]), dim=0)


# ---------------------------------------------------------------------------------------------- previews






def preview_mosaic(images, columns: dict, row_labels=None, tile=160) -> Image.Image:
    """A picture a pathologist judges in seconds: one row per uint8 (3, H, W) patch, original | each normalizer's
    output (columns: {title: fitted MacenkoNormalizer}), titles on top and an optional label above each row."""
    from PIL import ImageDraw
    titles, gap, text = ["original", *columns], 4, 14
    width = len(titles) * (tile + gap) + gap
    canvas = Image.new("RGB", (width, text + len(images) * (tile + text + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((gap + c * (tile + gap), 1), title, fill="black")
    for r, image in enumerate(images):
        top = text + r * (tile + text + gap) + gap
        draw.text((gap, top), str(row_labels[r]) if row_labels else "", fill="black")
        outs = [image] + [n.normalize(image[None].to(n.device))[0].mul(255).round().to(torch.uint8).cpu()
                          for n in columns.values()]  # one patch at a time: sizes may differ
        for c, out in enumerate(outs):
            picture = Image.fromarray(out.permute(1, 2, 0).numpy()).resize((tile, tile), Image.Resampling.LANCZOS)
            canvas.paste(picture, (gap + c * (tile + gap), top + text))
    return canvas


def stain_preview(normalizer, paths, labels, out_png) -> None:
    """preview_mosaic of image files as `normalizer` (e.g. a checkpoint's) normalizes them and as canonical
    Macenko does to the same reference stain (its state in mode macenko), written atomically to out_png."""
    canonical = MacenkoNormalizer.from_state_dict({**normalizer.state_dict(), "mode": "macenko"})
    columns = {f"as trained ({normalizer.mode})": normalizer, "canonical Macenko": canonical.to(normalizer.device)}
    mosaic = preview_mosaic([load_rgb(p) for p in paths], columns, labels)
    with common.atomic_path(out_png) as tmp:
        mosaic.save(tmp, "PNG")
