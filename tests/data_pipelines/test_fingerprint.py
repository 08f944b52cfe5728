"""Content fingerprints: whole-file sha256 (memoised), AnnData fingerprints, weights hashes."""

import hashlib
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from data_pipelines import keys
from data_pipelines.fingerprint import adata_fingerprint, file_digest
from data_pipelines.slides import read_her2st

from .conftest import make_her2st_root, write_rgb


def test_file_digest_is_sha256_and_memoised_by_size_and_mtime(tmp_path):
    p = tmp_path / "w.bin"
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()  # 3 blocks
    p.write_bytes(data)
    d = file_digest(p)
    assert d == hashlib.sha256(data).hexdigest() and len(d) == 64
    st = os.stat(p)
    # same size, same mtime: the memo answers without reading (the old digest comes back)
    p.write_bytes(data[:-1] + b"\0" if data[-1] else data[:-1] + b"\1")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_digest(p) == d
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: read again
    assert file_digest(p) == hashlib.sha256(p.read_bytes()).hexdigest() != d
    assert file_digest(tmp_path / "." / "w.bin") == file_digest(p)  # keyed by the real path


def test_weights_fingerprint_covers_every_byte(tmp_path):
    from stimage_jax.features.extract import weights_fingerprint

    data = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8)
    a, b, c = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    a.write_bytes(data.tobytes())
    data[2 << 20] ^= 0xFF  # differ at byte 2 MiB only: same first MiB, same size
    b.write_bytes(data.tobytes())
    c.write_bytes(a.read_bytes())
    fa, fb = weights_fingerprint(a), weights_fingerprint(b)
    assert fa != fb and len(fa) == len(fb) == 10
    assert fa == weights_fingerprint(c) == hashlib.sha256(a.read_bytes()).hexdigest()[:10]
    assert weights_fingerprint(None) == "random"


def _toy(tmp_path):
    root = make_her2st_root(tmp_path / "her2st")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_her2st(root, "Z1"), root / "data/ST-imgs/Z/Z1/he.jpg"


def test_adata_fingerprint_follows_content_not_names_of_files(tmp_path):
    a, image = _toy(tmp_path)
    base = adata_fingerprint(a)
    assert len(base) == 64 and adata_fingerprint(a.copy()) == base
    # the same counts stored as CSC are the same data
    b = a.copy()
    b.X = sp.csc_matrix(b.X)
    assert adata_fingerprint(b) == base

    def changed(edit) -> str:
        c = a.copy()
        edit(c)
        return adata_fingerprint(c)

    def bump_count(c):
        x = c.X.tolil()
        x[1, 2] = x[1, 2] + 1
        c.X = x.tocsr()

    variants = {
        "count": changed(bump_count),
        "obs_names": changed(lambda c: setattr(c, "obs_names", [f"{n}_" for n in c.obs_names])),
        "var_names": changed(lambda c: setattr(c, "var_names", [f"{n}_" for n in c.var_names])),
        "spatial": changed(lambda c: c.obsm[keys.SPATIAL].__setitem__((0, 0), c.obsm[keys.SPATIAL][0, 0] + 0.5)),
        "mpp": changed(lambda c: c.uns[keys.SPATIAL_UNS]["Z1"]["metadata"].__setitem__(keys.MPP, 4.1)),
        "scalefactor": changed(lambda c: c.uns[keys.SPATIAL_UNS]["Z1"]["scalefactors"].__setitem__(
            keys.SPOT_DIAMETER_FULLRES, 26.0)),
    }
    assert len(set(variants.values()) | {base}) == len(variants) + 1, variants
    # a label or QC column is not training input
    assert changed(lambda c: c.obs.__setitem__("tissue_coverage", 0.5)) == base

    # the image: its content counts, not where it lies
    moved = tmp_path / "elsewhere" / "he.jpg"
    moved.parent.mkdir()
    moved.write_bytes(image.read_bytes())
    c = a.copy()
    c.uns[keys.SPATIAL_UNS]["Z1"]["metadata"][keys.IMAGE_PATH] = str(moved)
    assert adata_fingerprint(c) == base
    write_rgb(moved, np.full((260, 190, 3), 90, np.uint8))  # same name, new pixels
    assert adata_fingerprint(c) != base
    moved.unlink()  # a missing image contributes its path only
    gone = adata_fingerprint(c)
    assert gone not in (base, adata_fingerprint(a))


@pytest.mark.real_data
def test_adata_fingerprint_real_section_and_no_jax(her2st_root):
    a = read_her2st(her2st_root, "C2", require_image=True)
    fp = adata_fingerprint(a)
    assert fp == adata_fingerprint(read_her2st(her2st_root, "C2", require_image=True))
    path = a.uns[keys.SPATIAL_UNS]["C2"]["metadata"][keys.IMAGE_PATH]
    assert file_digest(path) == hashlib.sha256(open(path, "rb").read()).hexdigest()
    # NumPy only: the ONNX runtime may import it without JAX
    code = "import sys, data_pipelines.fingerprint; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
