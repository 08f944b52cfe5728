"""Gene panels: markers, top-HVG on training samples, files, and unknown genes."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_pipelines.errors import StimageError
from stimage_jax.genes import MARKERS, select_genes, top_hvg


def _sample(rng, name, n=200):
    genes = [f"G{i}" for i in range(30)]
    base = rng.poisson(5.0, size=(n, 30)).astype(float)
    base[:, 0] = rng.negative_binomial(0.5, 0.5 / 10.5, size=n)  # very over-dispersed: top HVG
    base[:, 1] = 0
    base[: n // 20, 1] = 50  # detected in 5% of spots only: must be dropped despite variance
    a = ad.AnnData(sp.csr_matrix(base.astype(np.int32)), obs=pd.DataFrame({"sample": name}, index=[f"{name}{i}" for i in range(n)]),
                   var=pd.DataFrame(index=genes))
    return a


def test_top_hvg_prefers_overdispersed_and_drops_rare(rng):
    adatas = [_sample(rng, "a"), _sample(rng, "b")]
    hv = top_hvg(adatas, 3)
    assert hv[0] == "G0"
    assert "G1" not in top_hvg(adatas, 28)
    with pytest.raises(StimageError, match="only 29 genes"):
        top_hvg(adatas, 30)


def test_specs(rng, tmp_path):
    a = _sample(rng, "a")
    f = tmp_path / "genes.txt"
    f.write_text("G3\n# comment\nG5\n")
    assert select_genes(f"file:{f}", [a]) == ["G3", "G5"]
    assert select_genes("G7,G2", [a]) == ["G7", "G2"]
    assert len(MARKERS) == 14 and "VEGFA" in MARKERS
    with pytest.raises(StimageError, match="2 gene\\(s\\) not in sample a: NOPE, ALSO"):
        select_genes("G1,NOPE,ALSO", [a])
    with pytest.raises(StimageError, match="top-hvg:N"):
        select_genes("top-hvg:x", [a])
