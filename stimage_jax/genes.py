"""Gene panels: the paper's 14 markers, top highly-variable genes, or a file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from data_pipelines.errors import StimageError

__all__ = ["MARKERS", "select_genes", "top_hvg", "check_genes"]

# The 14 breast-cancer markers the STimage paper models.
MARKERS = ("CD74", "CD63", "CD81", "COX6C", "TP53", "PABPC1", "GNAS", "B2M", "SPARC",
           "HSP90AB1", "TFF3", "ATP1A1", "FASN", "VEGFA")


def check_genes(genes, available, where: str) -> None:
    """Raise one line naming every requested gene missing from ``available``."""
    have = set(available)
    missing = [g for g in genes if g not in have]
    if missing:
        more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
        raise StimageError(f"{len(missing)} gene(s) not in {where}: {', '.join(missing[:10])}{more}")


def top_hvg(adatas, n: int, min_frac: float = 0.1) -> list[str]:
    """Top ``n`` highly variable genes over the given (training) samples, pooled.

    Genes detected in fewer than ``min_frac`` of spots are dropped first. Variability is
    Seurat's normalised dispersion: counts scaled to 10^4 per spot, log1p; dispersion
    var/mean of the expression, z-scored within (up to) 20 quantile bins of mean expression. Only genes
    common to all samples are candidates.
    """
    common = sorted(set.intersection(*(set(a.var_names) for a in adatas)))
    if not common:
        raise StimageError("the training samples share no genes")
    mats = [a[:, common].X for a in adatas]
    X = sp.vstack([sp.csr_matrix(m) for m in mats]).astype(np.float64).tocsr()
    frac = np.asarray((X > 0).mean(0)).ravel()
    keep = frac >= min_frac
    if keep.sum() < n:
        raise StimageError(f"only {int(keep.sum())} genes are detected in >= {min_frac:.0%} of "
                           f"spots; asked for top-hvg:{n}")
    tot = np.asarray(X.sum(1)).ravel()
    norm = sp.diags(1e4 / np.maximum(tot, 1.0)) @ X
    E = norm.tocsc()[:, keep]
    E.data = np.log1p(E.data)
    mean = np.asarray(E.mean(0)).ravel()
    sq = np.asarray(E.multiply(E).mean(0)).ravel()
    var = np.maximum(sq - mean**2, 0) * X.shape[0] / max(X.shape[0] - 1, 1)
    disp = np.log(np.maximum(var, 1e-12) / np.maximum(mean, 1e-12))
    # Up to 20 bins with >= 50 genes each: a bin of one or two genes has no spread to
    # z-score against, and would rank its genes arbitrarily.
    n_bins = int(np.clip(len(mean) // 50, 1, 20))
    edges = np.quantile(mean, np.linspace(0, 1, n_bins + 1)[1:-1])
    bins = np.digitize(mean, edges)
    z = np.zeros_like(disp)
    for b in np.unique(bins):
        m = bins == b
        sd = disp[m].std(ddof=1) if m.sum() > 1 else 0.0
        z[m] = (disp[m] - disp[m].mean()) / sd if sd > 0 else 0.0
    cand = np.asarray(common)[keep]
    order = np.lexsort((cand, -z))  # ties broken by name: deterministic
    return [str(g) for g in cand[order[:n]]]


def select_genes(spec: str, adatas) -> list[str]:
    """``markers`` | ``top-hvg:N`` | ``file:PATH`` (one symbol per line) | ``G1,G2,...``."""
    if spec == "markers":
        genes = list(MARKERS)
    elif spec.startswith("top-hvg:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise StimageError(f"bad gene spec {spec!r}: expected top-hvg:N with an integer N") from None
        return top_hvg(adatas, n)
    elif spec.startswith("file:"):
        path = Path(spec[5:])
        if not path.is_file():
            raise StimageError(f"gene list file {path} not found")
        genes = [g.strip() for g in path.read_text().splitlines() if g.strip() and not g.startswith("#")]
    else:
        genes = [g.strip() for g in spec.split(",") if g.strip()]
    if not genes:
        raise StimageError(f"gene spec {spec!r} selects no genes")
    if len(set(genes)) != len(genes):
        raise StimageError(f"gene spec {spec!r} lists a gene twice")
    for a in adatas:
        check_genes(genes, a.var_names, f"sample {a.obs['sample'].iloc[0] if 'sample' in a.obs else '?'}")
    return genes
