"""Does stain normalization keep every bacterium brown and paint no nucleus brown? A synthetic IHC check of every
macenko_gpu mode, built from scikit-image's real IHC sample (needs requirements-dev.txt: scikit-image, sklearn).

Usage:
    python tools/stain_check.py                       # the table for every mode and reference
    python tools/stain_check.py --modes ihc --seed 1  # one mode, other rods

Cases (all 256 px; rgb2hed/hed2rgb define hematoxylin and DAB, as in tests/test_macenko.py):
  * hematoxylin-only patches: skimage.data.immunohistochemistry() with its DAB channel zeroed, hematoxylin x2-4;
  * sparse bacteria: the same patches with rods of 2-3 x 8-15 px added in HED space at DAB 0.08 (a strong rod, as
    the demo's) or 0.035 (faint), covering 0.05% to 2% of the pixels;
  * tissue-rich two-stain patches: the unmodified IHC sample in 128 px tiles;
  * references: hematoxylin-only tissue with dense (5%) or moderate (0.5%) strong rods, and the real sample's
    lower-right quadrant (diffuse DAB on 34% of its pixels).
Columns: worst per-patch AUROC of the output's DAB (rgb2hed) separating rod pixels from the rest, strong and faint
rods; the smallest ratio of the rods' mean output DAB to their input DAB; the largest share of pixels above DAB
0.03 on a hematoxylin-only patch (a brown nucleus); mean |difference| in grey levels to canonical Macenko
(mode macenko) on the tissue-rich two-stain tiles. Targets: AUROC >= 0.95, kept >= 0.5, brown < 0.1%.
Then two small tables: the reference's DAB vector (degrees off the true one) fitted from each of 8 sparse-rod
patches alone and from the 8 pooled (--reference-patch with several files); and MacenkoNormalizer.dab_angles of
8-patch slides whose DAB is turned 0, +-5, +-10 degrees (train.py's stain survey), with what the ihc mode then
does to their rods' DAB.
Exit codes: 0 printed, 2 bad flag or missing dev dependency.
"""
from __future__ import annotations

from pathlib import Path
import argparse
import sys

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]  # the workflow's commands and modules, one folder up
sys.path.insert(0, str(REPO))

import common
import macenko_gpu
from macenko_gpu import MacenkoNormalizer

STRONG_DAB, FAINT_DAB = 0.08, 0.035  # rgb2hed DAB of a rod: the demo's rods ~0.07; brown threshold 0.03
BROWN = 0.03  # rgb2hed DAB above which a pixel reads as brown
COVERAGES = (0.0005, 0.002, 0.005, 0.02)  # share of a patch's pixels on rods
SIZE = 256


def _skimage():
    try:
        from skimage import data
        from skimage.color import hed2rgb, rgb2hed
    except ImportError:
        raise ValueError("stain_check needs scikit-image: pip install -r requirements-dev.txt") from None
    return data, hed2rgb, rgb2hed


def ihc_sample() -> np.ndarray:
    """skimage's 512x512 IHC sample (hematoxylin + diffuse DAB), uint8 (H, W, 3)."""
    return _skimage()[0].immunohistochemistry()


def hematoxylin_only(gain=3.0) -> np.ndarray:
    """HED (512, 512, 3) of the IHC sample with DAB removed and hematoxylin times gain (tissue-rich)."""
    hed = _skimage()[2](ihc_sample())
    hed[..., 0] *= gain
    hed[..., 2] = 0
    return hed


def add_rods(hed, rng, coverage, dab) -> tuple[np.ndarray, np.ndarray]:
    """hed plus rods (2-3 px wide, 8-15 px long, any orientation) of DAB `dab` until `coverage` of the pixels is
    covered; returns (hed, rod mask)."""
    h, w = hed.shape[:2]
    mask = np.zeros((h, w), dtype=bool)
    yy, xx = np.mgrid[-8:9, -8:9]
    while mask.mean() < coverage:
        length, width, angle = rng.uniform(8, 15), rng.uniform(2, 3), rng.uniform(0, np.pi)
        along = xx * np.cos(angle) + yy * np.sin(angle)
        across = -xx * np.sin(angle) + yy * np.cos(angle)
        rod = (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)
        y, x = rng.integers(8, h - 9), rng.integers(8, w - 9)
        mask[y - 8:y + 9, x - 8:x + 9] |= rod
    out = hed.copy()
    out[..., 2] = np.where(mask, dab, out[..., 2])
    return out, mask


def to_uint8(hed, dab_turn=0.0) -> torch.Tensor:
    """HED (H, W, 3) -> uint8 RGB (3, H, W), as a scanner would store it; dab_turn (degrees) turns the DAB vector
    in its plane with hematoxylin, away from hematoxylin when positive (another lab's or batch's DAB hue)."""
    rgb = (np.clip(_skimage()[1](hed), 0, 1) if not dab_turn else
           np.clip(np.exp(-(hed * -np.log(1e-6)) @ turned_stains(dab_turn)), 0, 1))
    return torch.from_numpy((rgb * 255).round().astype(np.uint8)).permute(2, 0, 1).contiguous()


def true_dab() -> torch.Tensor:
    """The DAB unit vector (3,) the synthetic cases are mixed with: scikit-image's rgb_from_hed row."""
    from skimage.color import rgb_from_hed
    return torch.nn.functional.normalize(torch.tensor(rgb_from_hed[2], dtype=torch.float64), dim=0)


def turned_stains(degrees) -> np.ndarray:
    """scikit-image's rgb_from_hed with its DAB row turned `degrees` away from hematoxylin, same length."""
    from skimage.color import rgb_from_hed
    m = rgb_from_hed.copy()
    h, d = m[0] / np.linalg.norm(m[0]), m[2] / np.linalg.norm(m[2])
    e = (d - (d @ h) * h) / np.linalg.norm(d - (d @ h) * h)
    angle = np.arccos(d @ h) + np.radians(degrees)
    m[2] = (np.cos(angle) * h + np.sin(angle) * e) * np.linalg.norm(m[2])
    return m


def quadrants(image, size=SIZE) -> torch.Tensor:
    """(..., H, W) -> (n, ..., size, size): non-overlapping tiles, row by row."""
    h, w = image.shape[-2:]
    return torch.stack([image[..., y:y + size, x:x + size] for y in range(0, h - size + 1, size)
                        for x in range(0, w - size + 1, size)])


def dab_of(images) -> np.ndarray:
    """rgb2hed's DAB of uint8 or [0, 1] float (B, 3, H, W) images -> (B, H, W)."""
    rgb2hed = _skimage()[2]
    levels = images if images.dtype == torch.uint8 else images.mul(255).round().to(torch.uint8)
    return np.stack([rgb2hed(t.permute(1, 2, 0).cpu().numpy())[..., 2] for t in levels])


def hematoxylin_cases() -> torch.Tensor:
    """12 hematoxylin-only patches: 4 quadrants x hematoxylin gain 2, 3, 4."""
    return torch.cat([quadrants(to_uint8(hematoxylin_only(g))) for g in (2.0, 3.0, 4.0)])


def rod_cases(seed=0) -> dict:
    """{'strong'|'faint': (uint8 (16, 3, 256, 256), rod masks (16, 256, 256))}: 4 quadrants x 4 coverages."""
    rng, base, cases = np.random.default_rng(seed), hematoxylin_only(), {}
    for name, dab in (("strong", STRONG_DAB), ("faint", FAINT_DAB)):
        tiles, masks = [], []
        for q, window in enumerate(quadrants(torch.from_numpy(base).permute(2, 0, 1))):
            for coverage in COVERAGES:
                hed, mask = add_rods(window.permute(1, 2, 0).numpy(), rng, coverage, dab)
                tiles.append(to_uint8(hed))
                masks.append(torch.from_numpy(mask))
        cases[name] = (torch.stack(tiles), torch.stack(masks))
    return cases


def references(seed=0) -> dict:
    """Stain references, uint8 (3, 256, 256): dense and moderate rods on hematoxylin-only tissue, a real IHC tile;
    'weak' (a single rod) is one the normalizer must refuse."""
    rng = np.random.default_rng(seed + 1000)
    base = hematoxylin_only()[256:, :256]
    refs = {f"rods {c:.1%}": to_uint8(add_rods(base, rng, c, STRONG_DAB + 0.04)[0]) for c in (0.05, 0.005)}
    refs["real IHC tile"] = torch.from_numpy(ihc_sample()[256:, 256:]).permute(2, 0, 1).contiguous()
    refs["weak: one rod"] = to_uint8(add_rods(base, rng, 0.0002, STRONG_DAB)[0])
    return refs


def sparse_references(seed=0, coverage=0.002, count=8) -> list:
    """`count` single-patch references as a user picks them: hematoxylin-only quadrants with a few strong rods
    (`coverage` of their pixels), uint8 (3, 256, 256) each."""
    rng, tiles = np.random.default_rng(seed + 2000), []
    quads = quadrants(torch.from_numpy(hematoxylin_only()).permute(2, 0, 1))
    for k in range(count):
        tiles.append(to_uint8(add_rods(quads[k % len(quads)].permute(1, 2, 0).numpy(), rng, coverage,
                                       STRONG_DAB + 0.04 * (k % 2))[0]))
    return tiles


def dab_error(norm) -> float:
    """Degrees between a fitted normalizer's DAB vector and the true one."""
    cos = float(norm.stain_matrix[:, 1].double() @ true_dab())
    return float(np.degrees(np.arccos(min(1.0, cos))))


def reference_check(seed=0) -> dict:
    """The reference's DAB vector fitted from one sparse patch (each of 8) or from all 8 pooled: degrees off the
    true DAB vector, per coverage."""
    out = {}
    for coverage in (0.005, 0.002):
        refs = sparse_references(seed, coverage)
        singles = [dab_error(MacenkoNormalizer().fit(r)) for r in refs]
        out[coverage] = {"single": singles, "pooled": dab_error(MacenkoNormalizer().fit(refs))}
    return out


HUE_TURNS = (0.0, 5.0, -5.0, 10.0, -10.0)


def hue_check(seed=0) -> dict:
    """MacenkoNormalizer.dab_angles of synthetic slides (8 patches, rods on 0.2% of their pixels) whose DAB is
    turned by each of HUE_TURNS degrees, against a reference pooled from 8 patches of the true DAB; and the rods'
    mean output DAB over input DAB under the ihc mode (what a far hue does to the signal)."""
    rng, norm = np.random.default_rng(seed + 3000), MacenkoNormalizer().fit(sparse_references(seed, 0.005))
    quads = quadrants(torch.from_numpy(hematoxylin_only()).permute(2, 0, 1))
    rows = {}
    for turn in HUE_TURNS:
        cases = [add_rods(quads[k % 4].permute(1, 2, 0).numpy(), rng, 0.002, STRONG_DAB) for k in range(8)]
        slide = torch.stack([to_uint8(hed, turn) for hed, _ in cases])
        masks = np.stack([m for _, m in cases])
        out, plain = dab_of(norm.normalize(slide)), dab_of(torch.stack([to_uint8(hed) for hed, _ in cases]))
        rows[turn] = {"angle": norm.dab_angles([slide])[0], "rod_dab_ratio": float(out[masks].mean() / plain[masks].mean())}
    return rows


def format_reference_table(ref: dict, hue: dict) -> str:
    lines = ["| reference DAB vector, rods on | one patch (min / median / max of 8) | 8 patches pooled |", "|---|---|---|"]
    for coverage, r in ref.items():
        lines.append(f"| {coverage:.1%} of pixels | {min(r['single']):.1f} / {np.median(r['single']):.1f} / "
                     f"{max(r['single']):.1f} degrees | {r['pooled']:.1f} degrees |")
    lines += ["", "| slide DAB turned | measured (dab_angles) | rod DAB out / true-hue rod DAB out (ihc) |", "|---|---|---|"]
    for turn, r in hue.items():
        measured = "too little DAB" if r["angle"] is None else f"{r['angle']:.1f} degrees"
        lines.append(f"| {turn:+.0f} degrees | {measured} | x{r['rod_dab_ratio']:.2f} |")
    return "\n".join(lines)


def rod_scores(out, tiles, masks) -> tuple[float, float]:
    """(worst per-patch AUROC of output DAB for rod pixels, smallest ratio of rods' mean DAB output/input)."""
    from sklearn.metrics import roc_auc_score
    dab_in, dab_out, m = dab_of(tiles), dab_of(out), masks.numpy()
    aurocs = [roc_auc_score(m[i].ravel(), dab_out[i].ravel()) for i in range(len(m))]
    kept = [dab_out[i][m[i]].mean() / dab_in[i][m[i]].mean() for i in range(len(m))]
    return float(min(aurocs)), float(min(kept))


def brown_share(out) -> float:
    """Largest share of a patch's pixels with rgb2hed DAB above BROWN."""
    return float((dab_of(out) > BROWN).reshape(len(out), -1).mean(1).max())


def check(modes=macenko_gpu.MODES, seed=0) -> list[dict]:
    """One row per (reference, mode) with the columns of the module docstring; refused references noted."""
    rods, hematoxylin = rod_cases(seed), hematoxylin_cases()
    rich = quadrants(torch.from_numpy(ihc_sample()).permute(2, 0, 1), 128)
    rows = []
    for ref_name, ref in references(seed).items():
        canonical = None
        for mode in ("macenko", *[m for m in modes if m != "macenko"]):
            row = {"reference": ref_name, "mode": mode}
            try:
                norm = MacenkoNormalizer(mode=mode).fit(ref)
            except ValueError as err:
                rows.append({**row, "refused": str(err).split(";")[0].split(":")[0]})
                continue
            out = norm.normalize(rich)
            canonical = out if mode == "macenko" else canonical
            for kind, (tiles, masks) in rods.items():
                row[f"auroc_{kind}"], row[f"kept_{kind}"] = rod_scores(norm.normalize(tiles), tiles, masks)
            row["brown_share"] = brown_share(norm.normalize(hematoxylin))
            row["vs_macenko_levels"] = float((out - canonical).abs().mean() * 255) if canonical is not None else None
            if mode in modes:
                rows.append(row)
    return rows


def format_table(rows) -> str:
    head = ("| reference | mode | AUROC strong rods (worst) | AUROC faint rods (worst) | rod DAB kept (min) | "
            "brown pixels, H-only (worst) | vs canonical, rich tiles (grey levels) |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['reference']} | {r['mode']} | refused: {r['refused']} | | | | |")
            continue
        lines.append(f"| {r['reference']} | {r['mode']} | {r['auroc_strong']:.3f} | {r['auroc_faint']:.3f} | "
                     f"{min(r['kept_strong'], r['kept_faint']):.2f} | {100 * r['brown_share']:.2f}% | "
                     f"{'-' if r['vs_macenko_levels'] is None else format(r['vs_macenko_levels'], '.2f')} |")
    return "\n".join(lines)


def get_args_parser():
    p = argparse.ArgumentParser(description="Synthetic IHC check of the stain normalizer modes: AUROC of bacteria, "
                                "DAB kept, brown pixels invented on hematoxylin-only patches (a table, ~1 min).",
                                formatter_class=common.HelpFormatter, allow_abbrev=False)
    p.add_argument("--modes", nargs="+", choices=macenko_gpu.MODES, default=list(macenko_gpu.MODES),
                   help="modes to check (ihc is the normalizer's default)")
    p.add_argument("--seed", type=int, default=0, help="rod placement seed")
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        print(format_table(check(args.modes, args.seed)))
        print()
        print(format_reference_table(reference_check(args.seed), hue_check(args.seed)))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return common.EXIT_BAD_INPUT
    return common.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
