"""Agreement of predicted pseudo-bulk with measured bulk expression: Pearson and Spearman
per gene across samples and per sample across genes, after the paper's normalisation
(log1p for predictions, log1p CPM for counts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from data_pipelines.errors import StimageError

__all__ = ["correlations", "run_bulk"]


def _corr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from scipy.stats import pearsonr, spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan")
    return float(pearsonr(a, b)[0]), float(spearmanr(a, b)[0])


def correlations(pred: pd.DataFrame, bulk: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per gene: gene,pcc,spearman,n_samples; per sample: sample,pcc,spearman,n_genes) on
    the samples and genes both tables share."""
    samples = [s for s in pred.index if s in set(bulk.index)]
    genes = [g for g in pred.columns if g in set(bulk.columns)]
    if len(samples) < 3 or not genes:
        raise StimageError(f"{len(samples)} shared samples and {len(genes)} shared genes: need ≥ 3 and ≥ 1 "
                           "(first column = sample id, columns = gene names)")
    P, B = pred.loc[samples, genes], bulk.loc[samples, genes]
    g = pd.DataFrame([{"gene": x, **dict(zip(("pcc", "spearman"), _corr(P[x].to_numpy(), B[x].to_numpy()))),
                       "n_samples": len(samples)} for x in genes])
    s = pd.DataFrame([{"sample": x, **dict(zip(("pcc", "spearman"), _corr(P.loc[x].to_numpy(), B.loc[x].to_numpy()))),
                       "n_genes": len(genes)} for x in samples])
    return g, s


def _scatter(P: pd.DataFrame, B: pd.DataFrame, names, axis: str, out_png, title: str) -> None:
    from data_pipelines.io import atomic_path
    from export.clinical.tables import plt

    names = list(names)[:9]
    pyplot = plt()
    n = max(1, int(np.ceil(np.sqrt(len(names)))))
    fig, axes = pyplot.subplots(n, n, figsize=(3 * n, 3 * n), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        x = B[name] if axis == "gene" else B.loc[name]
        y = P[name] if axis == "gene" else P.loc[name]
        ax.scatter(x, y, s=8)
        ax.set_title(str(name), fontsize=8)
        ax.set_xlabel("bulk (normalised)", fontsize=7)
        ax.set_ylabel("predicted (normalised)", fontsize=7)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    pyplot.close(fig)


def run_bulk(pred, bulk, out, *, pred_transform: str = "auto", bulk_transform: str = "auto") -> dict:
    from data_pipelines.io import atomic_path
    from export.clinical.tables import normalise, read_expr

    P, pk = read_expr(pred)
    B, bk = read_expr(bulk)
    P, pu = normalise(P, pred_transform, pk)
    B, bu = normalise(B, bulk_transform, bk)
    g, s = correlations(P, B)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "bulk_genes.csv") as tmp:
        g.to_csv(tmp, index=False, float_format="%.10g")
    with atomic_path(out / "bulk_samples.csv") as tmp:
        s.to_csv(tmp, index=False, float_format="%.10g")
    samples, genes = s["sample"].tolist(), g["gene"].tolist()
    best = g.sort_values("pcc", ascending=False, na_position="last")["gene"]
    _scatter(P.loc[samples, genes], B.loc[samples, genes], best, "gene", out / "bulk_genes.png",
             "per gene across samples (best PCC first)")
    _scatter(P.loc[samples, genes], B.loc[samples, genes], samples, "sample", out / "bulk_samples.png",
             "per sample across genes")
    return {"genes": len(genes), "samples": len(samples), "pcc_median": float(np.nanmedian(g["pcc"])),
            "spearman_median": float(np.nanmedian(g["spearman"])), "pred_transform": pu, "bulk_transform": bu}
