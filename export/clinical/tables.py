"""Reading samples × genes tables (cohort.h5ad or CSV) and clinical tables, aligning them,
and the paper's normalisations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from data_pipelines.errors import StimageError

__all__ = ["read_expr", "read_table", "align", "normalise", "TRANSFORMS", "top_variable", "plt"]

TRANSFORMS = ("auto", "log", "cpm", "none")


def plt():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def read_table(path, what: str = "table") -> pd.DataFrame:
    """A CSV whose first column is the sample id."""
    p = Path(path)
    if not p.is_file():
        raise StimageError(f"{what} {p} not found")
    try:
        df = pd.read_csv(p, index_col=0)
    except (ValueError, pd.errors.ParserError) as e:
        raise StimageError(f"{what} {p} is not a readable CSV ({str(e).splitlines()[0]})") from None
    df.index = df.index.astype(str)
    if df.index.has_duplicates:
        raise StimageError(f"{what} {p}: sample id {df.index[df.index.duplicated()][0]!r} appears twice")
    return df


def read_expr(path) -> tuple[pd.DataFrame, str]:
    """cohort.h5ad (X, obs_names) or a samples × genes CSV → (numeric frame, "h5ad" | "csv")."""
    p = Path(path)
    if p.suffix == ".h5ad":
        from data_pipelines.slides.h5ad import read_anndata

        a = read_anndata(p, "expression")
        if a.X is None:
            raise StimageError(f"expression {p} has no X matrix")
        X = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
        try:
            frame = pd.DataFrame(np.asarray(X, np.float64), index=a.obs_names.astype(str),
                                 columns=a.var_names.astype(str))
        except (TypeError, ValueError):
            raise StimageError(f"expression {p}: X is not numeric") from None
        return _finite(frame, p), "h5ad"
    df = read_table(p, "expression")
    num = df.select_dtypes(include=[np.number])
    if num.shape[1] == 0:
        raise StimageError(f"expression {p} has no numeric gene columns")
    return _finite(num.astype(np.float64), p), "csv"


def _finite(df: pd.DataFrame, p: Path) -> pd.DataFrame:
    """Expression must be finite and of a size the models can fit (|x| < 1e100)."""
    v = df.to_numpy()
    bad = ~np.isfinite(v) | (np.abs(v) > 1e100)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise StimageError(f"expression {p}: sample {df.index[i]}, gene {df.columns[j]} is {v[i, j]!r}; "
                           "values must be finite numbers")
    return df


def normalise(df: pd.DataFrame, transform: str, kind: str) -> tuple[pd.DataFrame, str]:
    """The paper's normalisation: log1p for predictions, log1p(CPM) for counts; ``auto`` =
    log for cohort.h5ad, CPM for a CSV of non-negative integers, else as is."""
    if transform not in TRANSFORMS:
        raise StimageError(f"transform must be one of {', '.join(TRANSFORMS)}")
    v = df.to_numpy()
    if transform == "auto":
        if kind == "h5ad":
            transform = "log"
        elif np.all(v >= 0) and np.allclose(v, np.round(v)):
            transform = "cpm"
        else:
            transform = "none"
    if transform in ("log", "cpm") and np.nanmin(v) < 0:
        raise StimageError(f"a {transform} transform needs non-negative values")
    if transform == "log":
        return np.log1p(df), transform
    if transform == "cpm":
        tot = df.sum(axis=1).replace(0, np.nan)
        return np.log1p(df.div(tot, axis=0) * 1e6), transform
    return df, transform


def align(expr: pd.DataFrame, clin: pd.DataFrame, min_samples: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    common = [s for s in expr.index if s in set(clin.index)]
    if len(common) < min_samples:
        raise StimageError(f"only {len(common)} sample ids are in both tables (need {min_samples}); "
                           "the first column of each must be the sample id")
    return expr.loc[common], clin.loc[common]


def top_variable(df: pd.DataFrame, n: int | None) -> pd.DataFrame:
    if not n or n >= df.shape[1]:
        return df
    return df[df.var(axis=0).sort_values(ascending=False, kind="stable").index[:n]]
