"""Malformed-input generators: each *family* draws (with Hypothesis) one corruption of one
kind of input and pairs it with a command that reads it, giving a :class:`Case`.

A family is ``make(world, d, draw) -> Case``: ``world`` holds the pristine inputs
(:mod:`world`), ``d`` is a fresh folder (``d/in`` for the corrupted copies, ``d/out`` an
empty folder for outputs), ``draw`` is Hypothesis' ``data.draw``. ``Case.how`` says how
the input was made, so a failure is reproducible by hand.

Inputs: ``.h5ad`` (bytes and content: NaN/inf/negative/fractional/huge/text counts, empty,
duplicate ids, unicode and path-like names, missing or malformed metadata, missing or
corrupt image, empty tissue), images (PNG/TIFF bytes and content: header claiming 10^6 px,
1 px, grey, RGBA transparent, 16-bit, float, planar, blank), ``.onnx`` (bytes and
metadata), model folders (``model.json``, checkpoints), Space Ranger folders (h5, CSV,
JSON, PNG), HER2ST roots (gzip TSV, TSV, JPEG), nucleus annotations (MoNuSeg XML,
type CSV, ``.npy`` maps), cell models, clinical tables (CSV, ``.h5ad``), cohort slide
tables, and the command line itself (bad values, missing/unknown options, impossible paths).
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from harness import Case
from hypothesis import strategies as st
from world import TINY_TRAIN, World

__all__ = ["FAMILIES", "Family", "new_case_dir"]

Draw = Callable
PATH_LIKE = ["../evil", "a/b", "/etc/passwd", "..", ".", "~", "C:\\x", "a\x00b", "", " ", "-rf", "--out",
             "Ä\u0301ß😀", "\u202egene", "x" * 300, "G\nH", "%s%n", "CD74;rm", "*", "A,B"]


def new_case_dir(base: Path, n: int) -> Path:
    d = Path(base) / f"c{n:05d}"
    (d / "in").mkdir(parents=True)
    (d / "out").mkdir()
    return d


# --- byte-level corruption ----------------------------------------------------------------------------

def mutate_bytes(draw: Draw, data: bytes, kinds=("truncate", "bitflip", "empty", "garbage", "zeros")):
    """(new bytes, how, certainly-invalid?) — a truncated/empty/garbage file is invalid;
    flipped or zeroed bytes may still be a valid file (tolerant)."""
    kind = draw(st.sampled_from(kinds), label="byte mutation")
    n = len(data)
    if kind == "truncate":
        k = draw(st.integers(0, max(n - 1, 0)), label="keep bytes")
        return data[:k], f"truncated to its first {k} of {n} bytes", True
    if kind == "bitflip":
        bits = draw(st.lists(st.integers(0, 8 * n - 1), min_size=1, max_size=6, unique=True), label="bits")
        b = bytearray(data)
        for i in bits:
            b[i // 8] ^= 1 << (i % 8)
        return bytes(b), f"bits {bits} flipped (b[i//8] ^= 1 << i%8)", False
    if kind == "empty":
        return b"", "empty (0 bytes)", True
    if kind == "garbage":
        g = draw(st.binary(min_size=1, max_size=256), label="garbage")
        return g, f"replaced by bytes.fromhex({g.hex()!r})", True
    start = draw(st.integers(0, max(n - 1, 0)), label="zero start")
    length = draw(st.integers(1, 256), label="zero length")
    b = bytearray(data)
    b[start:start + length] = bytes(len(b[start:start + length]))
    return bytes(b), f"bytes {start}:{start + length} zeroed", False


def corrupt_copy(draw: Draw, src: Path, dst: Path, kinds=("truncate", "bitflip", "empty", "garbage", "zeros")):
    data, how, strict = mutate_bytes(draw, src.read_bytes(), kinds)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data)
    return f"{src.name}: {how}", strict


# --- h5ad content ----------------------------------------------------------------------------------------

def _read(path: Path):
    import anndata as ad

    return ad.read_h5ad(path)


def _dense(a):
    import scipy.sparse as sp

    return a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)


def _set_x(a, fn):
    x = _dense(a).astype(np.float64)
    fn(x)
    a.X = x


def _lib(a) -> dict:
    return next(iter(a.uns["spatial"].values()))


TILES, COUNTS, PRED = "tiles", "counts", "pred"


def _h5ad_edits(world: World):
    """name → (edit(adata, d, draw) -> how, commands-kinds for which it is certainly invalid)."""
    ALL = {TILES, COUNTS}

    def cell(draw, a):
        return draw(st.integers(0, a.n_obs - 1), label="spot"), draw(st.integers(0, a.n_vars - 1), label="gene")

    def count_value(bad):
        def edit(a, d, draw):
            i, j = cell(draw, a)
            _set_x(a, lambda x: x.__setitem__((i, j), bad))
            return f"X[{i}, {j}] = {bad!r} (dense float64)"
        return edit

    def huge(a, d, draw):
        v = draw(st.sampled_from([2.0**31, 2.0**40, 1e30, 1.7e308]), label="huge")
        i, j = cell(draw, a)
        _set_x(a, lambda x: x.__setitem__((i, j), v))
        return f"X[{i}, {j}] = {v!r}"

    def dtype(a, d, draw):
        t = draw(st.sampled_from(["bool", "float16", "uint8", "int64", "complex64"]), label="dtype")
        a.X = _dense(a).astype(t)
        return f"X as dense {t}"

    def empty_spots(a, d, draw):
        return a[:0].copy(), "0 spots (adata[:0])"

    def empty_genes(a, d, draw):
        return a[:, :0].copy(), "0 genes (adata[:, :0])"

    def no_x(a, d, draw):
        a.X = None
        return "X = None"

    def dup_obs(a, d, draw):
        names = list(a.obs_names)
        names[1] = names[0]
        a.obs_names = names
        return f"obs_names[1] = obs_names[0] = {names[0]!r}"

    def gene_names(a, d, draw):
        names = draw(st.lists(st.sampled_from(PATH_LIKE) | st.text(min_size=0, max_size=8), min_size=a.n_vars,
                              max_size=a.n_vars), label="gene names")
        a.var_names = names
        return f"var_names = {names!r}"

    def obs_names(a, d, draw):
        names = list(a.obs_names)
        k = draw(st.integers(0, a.n_obs - 1), label="spot")
        names[k] = draw(st.sampled_from(PATH_LIKE), label="name")
        a.obs_names = names
        return f"obs_names[{k}] = {names[k]!r}"

    def drop(path_desc):
        def edit(a, d, draw):
            if path_desc == "uns.stimage":
                del a.uns["stimage"]
            elif path_desc == "uns.spatial":
                del a.uns["spatial"]
            elif path_desc == "obsm.spatial":
                del a.obsm["spatial"]
            elif path_desc == "obs.sample":
                del a.obs["sample"]
            elif path_desc == "image_path":
                del _lib(a)["metadata"]["image_path"]
            elif path_desc == "mpp":
                del a.uns["stimage"]["mpp"]
            return f"deleted {path_desc}"
        return edit

    def mpp(a, d, draw):
        v = draw(st.sampled_from(["0.5", -1.0, 0.0, float("nan"), float("inf"), True, [1.0, 2.0], "abc"]),
                 label="mpp")
        a.uns["stimage"]["mpp"] = v
        return f"uns['stimage']['mpp'] = {v!r}"

    def mpp_extreme(a, d, draw):
        v = draw(st.sampled_from([1e-9, 1e-6, 1e4, 1e9]), label="mpp")  # never a size that could be allocated
        a.uns["stimage"]["mpp"] = v
        return f"uns['stimage']['mpp'] = {v!r}"

    def spatial(a, d, draw):
        kind = draw(st.sampled_from(["nan", "inf", "3 columns", "strings"]), label="spatial")
        xy = np.asarray(a.obsm["spatial"], np.float64)
        if kind == "nan":
            xy[draw(st.integers(0, a.n_obs - 1)), 0] = np.nan
        elif kind == "inf":
            xy[draw(st.integers(0, a.n_obs - 1)), 1] = np.inf
        elif kind == "3 columns":
            xy = np.c_[xy, xy[:, :1]]
        else:
            xy = xy.astype(str)
        a.obsm["spatial"] = xy
        return f"obsm['spatial']: {kind}"

    def spatial_far(a, d, draw):
        v = draw(st.sampled_from([-1e6, 1e6, 1e12, -1e300]), label="offset")
        a.obsm["spatial"] = np.asarray(a.obsm["spatial"], np.float64) + v
        return f"obsm['spatial'] += {v!r} (spots off the image)"

    def sample_nan(a, d, draw):
        s = a.obs["sample"].astype(object).to_numpy()
        s[0] = None
        a.obs["sample"] = s
        return "obs['sample'][0] = None"

    def image_path(a, d, draw):
        v = draw(st.sampled_from(["/nonexistent/x.png", str(d / "in"), "", "../../etc/passwd", str(world.wd),
                                  str(world.study[2])]), label="image path")
        _lib(a)["metadata"]["image_path"] = v
        return f"image_path = {v!r}"

    def image_bytes(a, d, draw):
        dst = d / "in" / "img.png"
        how, strict = corrupt_copy(draw, world.images[2], dst)
        _lib(a)["metadata"]["image_path"] = str(dst)
        return f"image {how}", strict

    def image_blank(a, d, draw):
        import cv2

        value = draw(st.sampled_from([255, 245, 0]), label="value")
        dst = d / "in" / "blank.png"
        img = cv2.imread(str(world.images[2]))
        cv2.imwrite(str(dst), np.full_like(img, value))
        _lib(a)["metadata"]["image_path"] = str(dst)
        return f"image replaced by a uniform {value} picture (no tissue)"

    # kinds: TILES = reads tiles (predict/latent/explain/train/benchmark); COUNTS = reads counts
    return {
        "counts_nan": (count_value(np.nan), ALL),
        "counts_inf": (count_value(np.inf), ALL),
        "counts_negative": (count_value(-3.0), ALL),
        "counts_fraction": (count_value(0.5), ALL),
        "counts_huge": (huge, ALL),
        "counts_dtype": (dtype, set()),
        "counts_text": ("text", ALL),
        "empty_spots": (empty_spots, ALL),
        "empty_genes": (empty_genes, ALL),
        "no_x": (no_x, ALL),
        "dup_obs": (dup_obs, set()),
        "gene_names": (gene_names, set()),
        "obs_names": (obs_names, set()),
        "no_uns_stimage": (drop("uns.stimage"), {TILES}),
        "no_uns_spatial": (drop("uns.spatial"), {TILES}),
        "no_obsm_spatial": (drop("obsm.spatial"), {TILES}),
        "no_obs_sample": (drop("obs.sample"), set()),
        "no_image_path": (drop("image_path"), {TILES}),
        "no_mpp": (drop("mpp"), {TILES}),
        "mpp_invalid": (mpp, ALL),
        "mpp_extreme": (mpp_extreme, set()),
        "spatial_invalid": (spatial, ALL),
        "spatial_far": (spatial_far, set()),
        "sample_nan": (sample_nan, ALL),
        "image_path": (image_path, {TILES}),
        "image_bytes": (image_bytes, {TILES}),
        "image_blank": (image_blank, set()),
    }


def _text_counts(path: Path) -> None:
    """Rewrite X (CSR group or dense) of an .h5ad as UTF-8 strings with h5py."""
    import h5py

    with h5py.File(path, "r+") as f:
        x = f["X"]
        if isinstance(x, h5py.Group):
            vals = x["data"][()]
            del x["data"]
            x.create_dataset("data", data=np.array([str(v) for v in vals], dtype=h5py.string_dtype()))
        else:
            vals = x[()]
            attrs = dict(x.attrs)
            del f["X"]
            f.create_dataset("X", data=vals.astype(str).astype(object), dtype=h5py.string_dtype())
            f["X"].attrs.update(attrs)


def edited_h5ad(world: World, d: Path, draw: Draw, src: Path, names=None) -> tuple[Path, str, set, bool]:
    """A content-edited copy of ``src``: (path, how, kinds it is certainly invalid for, byte_strict)."""
    import warnings

    edits = _h5ad_edits(world)
    name = draw(st.sampled_from(sorted(names or edits)), label="h5ad edit")
    fn, kinds = edits[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = _read(src)
        if fn == "text":
            how = "X data rewritten as strings (h5py)"
            res = None
        else:
            res = fn(a, d, draw)
        byte_strict = True
        if isinstance(res, tuple) and not isinstance(res[0], str):
            a, how = res
        elif isinstance(res, tuple):
            how, byte_strict = res
        elif res is not None:
            how = res
        out = d / "in" / src.name
        a.write_h5ad(out)
        if fn == "text":
            _text_counts(out)
    if name == "image_bytes" and not byte_strict:
        kinds = set()
    return out, f"{src.name} edited [{name}]: {how}", kinds, True


# --- commands reading an .h5ad ---------------------------------------------------------------------------

def _h5ad_command(world: World, d: Path, cmd: str, x: Path) -> tuple[list[str], str, list[Path], str]:
    """(argv, runner, outputs, kind) of ``cmd`` reading ``x``."""
    out = d / "out"
    s0, s1 = map(str, world.study[:2])
    if cmd == "predict-jax":
        o = out / "p.h5ad"
        return ["--quiet", "predict", "--model", str(world.wd), "--data", str(x), "--out", str(o)], "stimage", [o], TILES
    if cmd == "predict-onnx":
        o = out / "p.h5ad"
        return ["--quiet", "predict", "--model", str(world.onnx), "--data", str(x), "--out", str(o)], "stimage", [o], TILES
    if cmd == "export-predict":
        o = out / "p.h5ad"
        return ["--model", str(world.onnx), "--data", str(x), "--out", str(o), "--quiet"], "export", [o], TILES
    if cmd == "evaluate-truth":
        o, p = out / "m.csv", out / "maps.png"
        return (["--quiet", "evaluate", "--pred", str(world.pred), "--truth", str(x), "--out", str(o), "--plot", str(p),
                 "--plot-calibration", str(out / "cal.png")], "stimage", [o, p, out / "cal.png"], COUNTS)
    if cmd == "latent":
        o = out / "latent.png"
        return ["--quiet", "latent", "--model", str(world.wd), "--data", str(x), "--genes", "A,B", "--out", str(o)], \
            "stimage", [o], TILES
    if cmd == "explain":
        o = out / "ex"
        return (["--quiet", "explain", "--model", str(world.onnx), "--data", str(x), "--spot", world.spot, "--gene", "A",
                 "--samples", "8", "--out", str(o)], "stimage", [o], TILES)
    if cmd == "train":
        o = out / "wd"
        return ["--quiet", "train", "--data", s0, str(x), "--workdir", str(o), *TINY_TRAIN], "stimage", [o], TILES
    if cmd == "benchmark":
        o = out / "bench"
        return (["--quiet", "benchmark", "--data", s0, s1, str(x), "--workdir", str(o), "--backbone", "tiny",
                 "--tile-px", "32", "--members", "1", "--max-epochs", "1", "--patience", "1", "--methods", "ridge",
                 "--genes", "A,B,C", "--samples", "s0"], "stimage", [o], TILES)
    raise ValueError(cmd)


H5AD_COMMANDS = ("predict-jax", "predict-onnx", "export-predict", "evaluate-truth", "latent", "explain")
# Training reads are expensive when a tolerated input trains to the end: only certain failures.
H5AD_TRAIN_COMMANDS = ("train", "benchmark")


def _case(world, d, family, argv, runner, outputs, strict, how) -> Case:
    return Case(family, argv, runner, inputs=[d / "in", world.root], watch=[d, world.root], outputs=outputs,
                strict=strict, how=how)


def fam_h5ad_bytes(world: World, d: Path, draw: Draw, commands=H5AD_COMMANDS) -> Case:
    cmd = draw(st.sampled_from(commands), label="command")
    src = world.pred if cmd == "evaluate-pred" else world.study[2]
    x = d / "in" / src.name
    kinds = ("truncate", "empty", "garbage") if cmd in H5AD_TRAIN_COMMANDS else \
        ("truncate", "bitflip", "empty", "garbage", "zeros")
    how, strict = corrupt_copy(draw, src, x, kinds)
    if cmd == "evaluate-pred":
        o = d / "out" / "m.csv"
        argv, runner, outs = ["--quiet", "evaluate", "--pred", str(x), "--truth", str(world.study[2]), "--out",
                              str(o)], "stimage", [o]
    else:
        argv, runner, outs, _ = _h5ad_command(world, d, cmd, x)
    return _case(world, d, f"h5ad.bytes/{cmd}", argv, runner, outs, strict, how)


def fam_h5ad_content(world: World, d: Path, draw: Draw, commands=H5AD_COMMANDS) -> Case:
    cmd = draw(st.sampled_from(commands), label="command")
    names = None
    if cmd in H5AD_TRAIN_COMMANDS:  # only edits that must fail
        names = [n for n, (_, k) in _h5ad_edits(world).items() if TILES in k and n != "image_bytes"] + ["image_blank"]
    x, how, kinds, _ = edited_h5ad(world, d, draw, world.study[2], names)
    argv, runner, outs, kind = _h5ad_command(world, d, cmd, x)
    strict = kind in kinds or (cmd in H5AD_TRAIN_COMMANDS and "image_blank" in how)
    if cmd == "explain" and ("dup_obs" in how or "obs_names" in how):
        strict = False
    return _case(world, d, f"h5ad.content/{cmd}", argv, runner, outs, strict, how)


def fam_h5ad_train(world: World, d: Path, draw: Draw) -> Case:
    if draw(st.booleans(), label="bytes?"):
        return fam_h5ad_bytes(world, d, draw, H5AD_TRAIN_COMMANDS)
    return fam_h5ad_content(world, d, draw, H5AD_TRAIN_COMMANDS)


def fam_prediction(world: World, d: Path, draw: Draw) -> Case:
    """A corrupt or inconsistent prediction given to ``evaluate --pred``."""
    import warnings

    o = d / "out" / "m.csv"
    x = d / "in" / "pred.h5ad"
    kind = draw(st.sampled_from(["bytes", "empty", "disjoint_genes", "disjoint_spots", "x_nan", "x_negative",
                                 "no_layers", "member_shape", "dup_genes"]), label="prediction edit")
    strict = True
    if kind == "bytes":
        how, strict = corrupt_copy(draw, world.pred, x)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = _read(world.pred)
            if kind == "empty":
                a = a[:0].copy()
            elif kind == "disjoint_genes":
                a.var_names = [f"Z{i}" for i in range(a.n_vars)]
            elif kind == "disjoint_spots":
                a.obs_names = [f"other_{i}" for i in range(a.n_obs)]
            elif kind == "x_nan":
                x_ = np.asarray(a.X, np.float32).copy()
                x_[0, 0] = np.nan
                a.X = x_
                strict = False
            elif kind == "x_negative":
                x_ = np.asarray(a.X, np.float32).copy()
                x_[0, 0] = -1
                a.X = x_
                strict = False
            elif kind == "no_layers":
                for k in list(a.layers):
                    del a.layers[k]
                for k in [k for k in a.obsm if k.startswith("nb_member")]:
                    del a.obsm[k]
                strict = False
            elif kind == "member_shape":
                for k in [k for k in a.obsm if k.startswith("nb_member")]:
                    a.obsm[k] = np.asarray(a.obsm[k])[..., :1]
            elif kind == "dup_genes":
                a.var_names = ["A"] * a.n_vars
                strict = False
            a.write_h5ad(x)
        how = f"pred.h5ad edited [{kind}]"
    argv = ["--quiet", "evaluate", "--pred", str(x), "--truth", str(world.study[2]), "--out", str(o),
            "--plot", str(d / "out" / "maps.png"), "--plot-calibration", str(d / "out" / "cal.png")]
    return _case(world, d, f"prediction/{kind}", argv, "stimage", [o, d / "out" / "maps.png", d / "out" / "cal.png"],
                 strict, how)


# --- images --------------------------------------------------------------------------------------------------

def _image_content(draw: Draw, d: Path, suffix: str) -> tuple[Path, str, bool]:
    """A decodable-or-not image with odd content: (path, how, has-no-tissue)."""
    import cv2
    import tifffile

    kind = draw(st.sampled_from(["huge_header", "one_pixel", "grey", "rgba_transparent", "uint16", "float32",
                                 "planar", "blank", "black", "two_channel", "wide_strip"]), label="image content")
    p = d / "in" / f"img{suffix}"
    blank = False
    if kind == "huge_header":
        p = d / "in" / "img.tif"
        p.write_bytes(_huge_tiff_header(10**6, 10**6))
        how = "a 10^6 x 10^6 px TIFF header with no pixel data"
    elif kind == "planar":
        p = d / "in" / "img.tif"
        tifffile.imwrite(p, np.full((3, 64, 80), 200, np.uint8), photometric="rgb", planarconfig="separate")
        how = "planar (3, 64, 80) RGB TIFF"
    elif kind == "float32":
        p = d / "in" / "img.tif"
        tifffile.imwrite(p, np.random.default_rng(0).random((64, 64, 3), np.float32))
        how = "float32 (64, 64, 3) TIFF"
    else:
        shapes = {"one_pixel": ((1, 1, 3), np.uint8, 200), "grey": ((64, 64), np.uint8, 120),
                  "rgba_transparent": ((64, 64, 4), np.uint8, 0), "uint16": ((64, 64, 3), np.uint16, 40000),
                  "blank": ((64, 64, 3), np.uint8, 255), "black": ((64, 64, 3), np.uint8, 0),
                  "two_channel": ((64, 64, 2), np.uint8, 90), "wide_strip": ((1, 4000, 3), np.uint8, 150)}
        shape, dtype, value = shapes[kind]
        img = np.full(shape, value, dtype)
        if suffix in (".tif", ".tiff"):
            tifffile.imwrite(p, img)
        else:
            try:
                ok = cv2.imwrite(str(p), img)
            except cv2.error:
                ok = False
            if not ok:  # (a 2-channel PNG is not writable by OpenCV): write it as TIFF
                p = d / "in" / "img.tif"
                tifffile.imwrite(p, img)
        how = f"{kind}: constant {value} array {shape} {np.dtype(dtype).name}"
        blank = kind in ("blank", "rgba_transparent", "one_pixel", "wide_strip", "black", "grey", "two_channel",
                         "uint16")
    return p, f"{p.name}: {how}", blank


def _huge_tiff_header(w: int, h: int) -> bytes:
    """A little-endian baseline TIFF whose one IFD claims w x h RGB pixels (no data)."""
    import struct

    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, 8),
               (277, 3, 1, 3), (278, 4, 1, h), (279, 4, 1, w * h * 3 & 0xFFFFFFFF)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd


IMAGE_COMMANDS = ("segment-nuclei", "predict-slide-jax", "predict-slide-onnx", "export-predict-slide", "explain-tile",
                  "cells-evaluate-pred")


def _image_command(world: World, d: Path, cmd: str, x: Path):
    out = d / "out"
    if cmd == "segment-nuclei":
        o = out / "inst.png"
        return ["--quiet", "segment-nuclei", "--image", str(x), "--out", str(o), "--mpp", "0.5"], "stimage", [o]
    if cmd in ("predict-slide-jax", "predict-slide-onnx"):
        o = out / "s.h5ad"
        model = world.wd if cmd == "predict-slide-jax" else world.onnx
        return (["--quiet", "predict", "--model", str(model), "--slide", str(x), "--mpp", "1", "--genes", "A",
                 "--out", str(o)], "stimage", [o, out / "s_A.png"])
    if cmd == "export-predict-slide":
        o = out / "s.h5ad"
        return (["--model", str(world.onnx), "--slide", str(x), "--mpp", "1", "--genes", "A", "--out", str(o),
                 "--quiet"], "export", [o, out / "s_A.png"])
    if cmd == "explain-tile":
        o = out / "ex"
        return (["--quiet", "explain", "--model", str(world.onnx), "--tile", str(x), "--gene", "A", "--samples", "8",
                 "--out", str(o)], "stimage", [o])
    if cmd == "cells-evaluate-pred":
        o = out / "m.json"
        return (["--quiet", "cells", "evaluate", "--pred", str(x), "--truth", str(world.cells / "t0_instances.png"),
                 "--out", str(o)], "stimage", [o])
    if cmd == "cells-predict":
        o = out / "c.png"
        return (["--quiet", "cells", "predict", "--model", str(world.cell_wd), "--image", str(x), "--out", str(o)],
                "stimage", [o, out / "c_types.csv", out / "c_entropy.npy", out / "c_entropy.png"])
    raise ValueError(cmd)


def _image_source(world: World, cmd: str) -> Path:
    return {"segment-nuclei": world.he, "predict-slide-jax": world.slide_tif, "predict-slide-onnx": world.slide_png,
            "export-predict-slide": world.slide_tif, "explain-tile": world.tile,
            "cells-evaluate-pred": world.cells / "t0_instances.png", "cells-predict": world.he}[cmd]


def fam_image_bytes(world: World, d: Path, draw: Draw, commands=IMAGE_COMMANDS) -> Case:
    cmd = draw(st.sampled_from(commands), label="command")
    src = _image_source(world, cmd)
    x = d / "in" / src.name
    how, strict = corrupt_copy(draw, src, x)
    argv, runner, outs = _image_command(world, d, cmd, x)
    return _case(world, d, f"image.bytes/{cmd}", argv, runner, outs, strict, how)


def fam_image_content(world: World, d: Path, draw: Draw, commands=IMAGE_COMMANDS) -> Case:
    cmd = draw(st.sampled_from(commands), label="command")
    src = _image_source(world, cmd)
    x, how, blank = _image_content(draw, d, src.suffix)
    argv, runner, outs = _image_command(world, d, cmd, x)
    strict = "huge_header" in how or "float32" in how or (blank and "slide" in cmd)
    return _case(world, d, f"image.content/{cmd}", argv, runner, outs, strict, how)


# --- ONNX models -----------------------------------------------------------------------------------------------

ONNX_COMMANDS = ("predict-onnx", "export-predict", "export-predict-slide", "explain-onnx")


def _onnx_command(world: World, d: Path, cmd: str, m: Path):
    out = d / "out"
    o = out / "p.h5ad"
    if cmd == "predict-onnx":
        return ["--quiet", "predict", "--model", str(m), "--data", str(world.study[2]), "--out", str(o)], "stimage", [o]
    if cmd == "export-predict":
        return ["--model", str(m), "--data", str(world.study[2]), "--out", str(o), "--quiet"], "export", [o]
    if cmd == "export-predict-slide":
        return (["--model", str(m), "--slide", str(world.slide_tif), "--genes", "A", "--out", str(o), "--quiet"],
                "export", [o, out / "p_A.png"])
    if cmd == "explain-onnx":
        return (["--quiet", "explain", "--model", str(m), "--tile", str(world.tile), "--gene", "A", "--samples", "8",
                 "--out", str(out / "ex")], "stimage", [out / "ex"])
    raise ValueError(cmd)


def _onnx_meta_edit(draw: Draw):
    key = draw(st.sampled_from(["format", "genes", "tile_um", "tile_px", "provenance", "stain_reference", "members"]),
               label="metadata key")
    values = {
        "format": [None, "", "stimage-jax-onnx/0", "stimage-jax/2"],
        "genes": [None, "", "[", '["A", "B"]', '["A", "B", "C", "D"]', '["A", "A", "B"]', "[1, 2, 3]", '{"A": 1}',
                  '"ABC"', '["A", "", "C"]', "null", '["../evil", "a/b", "\\u00c4"]', '["A", null, "C"]'],
        "tile_um": [None, "", "0", "-26", "nan", "inf", "abc", "1e-30", "1e30", "[26]"],
        "tile_px": [None, "", "0", "-32", "16", "64", "32.5", "abc", "1e9", "99999999999999999999"],
        "provenance": [None, "", "[", "[]", '"x"', "null", "1"],
        "stain_reference": ["", "[", '{"method": "nope"}', '{"method": "macenko"}', "1",
                            ('{"method": "reinhard", "mean": [1, 2], "std": [1]}')],
        "members": ["0", "2", "abc", "-1"],
    }[key]
    value = draw(st.sampled_from(values), label="value")
    # certainly invalid unless the value is a harmless variant
    tolerant = (key, value) in {("genes", '["../evil", "a/b", "\\u00c4"]'), ("tile_um", "1e30"), ("tile_um", "1e-30")}
    return key, value, not tolerant


def fam_onnx(world: World, d: Path, draw: Draw, commands=ONNX_COMMANDS) -> Case:
    import onnx

    cmd = draw(st.sampled_from(commands), label="command")
    m = d / "in" / "model.onnx"
    if draw(st.booleans(), label="bytes?"):
        how, strict = corrupt_copy(draw, world.onnx, m)
        fam = "onnx.bytes"
    else:
        key, value, strict = _onnx_meta_edit(draw)
        model = onnx.load(str(world.onnx))
        props = {p.key: p.value for p in model.metadata_props}
        if value is None:
            props.pop(key, None)
        else:
            props[key] = value
        del model.metadata_props[:]
        for k, v in props.items():
            model.metadata_props.add(key=k, value=v)
        onnx.save(model, str(m))
        how = f"metadata {key!r} " + ("deleted" if value is None else f"= {value!r}") + " (onnx.load/save)"
        fam = "onnx.metadata"
    argv, runner, outs = _onnx_command(world, d, cmd, m)
    return _case(world, d, f"{fam}/{cmd}", argv, runner, outs, strict, how)


# --- JAX model folders ---------------------------------------------------------------------------------------

MODEL_COMMANDS = ("predict-jax", "export-onnx", "latent", "explain-saliency")


def _model_command(world: World, d: Path, cmd: str, wd: Path):
    out = d / "out"
    if cmd == "predict-jax":
        o = out / "p.h5ad"
        return ["--quiet", "predict", "--model", str(wd), "--data", str(world.study[2]), "--out", str(o)], [o]
    if cmd == "export-onnx":
        o = out / "m.onnx"
        return ["--quiet", "export-onnx", "--model", str(wd), "--out", str(o)], [o]
    if cmd == "latent":
        o = out / "l.png"
        return ["--quiet", "latent", "--model", str(wd), "--data", str(world.study[2]), "--genes", "A", "--out",
                str(o)], [o]
    if cmd == "explain-saliency":
        o = out / "ex"
        return (["--quiet", "explain", "--model", str(wd), "--tile", str(world.tile), "--gene", "A", "--method",
                 "saliency", "--samples", "2", "--out", str(o)], [o])
    raise ValueError(cmd)


def _json_edit(draw: Draw, cfg: dict, keys_values: dict, tolerated=frozenset()) -> tuple[dict, str, bool]:
    """(edited copy, how, certainly invalid?)."""
    key = draw(st.sampled_from(sorted(keys_values)), label="json key")
    value = draw(st.sampled_from(keys_values[key]), label="json value")
    cfg = json.loads(json.dumps(cfg))
    strict = not any(k == key and (v == value and type(v) is type(value)) for k, v in tolerated)
    if value == "<delete>":
        cfg.pop(key, None)
        return cfg, f"{key!r} deleted", strict
    cfg[key] = value
    return cfg, f"{key!r} = {value!r}", strict


# key → values; a value in CERTAIN is certainly invalid (the rest may be accepted, never with a traceback)
MODEL_JSON_EDITS = {
    "format": ["<delete>", "stimage-jax/9", None],
    "genes": ["<delete>", [], ["A", "A", "B"], ["A", "B"], "A,B,C", [1, 2, 3], None, ["A", "B", "C", "D"]],
    "tile_px": ["<delete>", 0, -32, "32", 1e9, 16, None, 32.5],
    "tile_um": ["<delete>", 0, -1, "26", None, float("nan")],
    "sources": ["<delete>", [], "tiny", [{"name": "tiny"}], None],
    "member_sources": ["<delete>", [], ["nope"], None, ["tiny", "tiny"]],
    "members": [0, -1, "1", 5, None],
    "backbone": ["<delete>", "nope", None],
    "fine_tune": ["yes", None],
    "head": ["<delete>", {}, {"hidden": -1}, None],
}
TOLERATED = {("tile_px", 16), ("members", "1"), ("members", 5), ("members", None), ("members", 0), ("members", -1),
             ("backbone", "<delete>"), ("backbone", "nope"), ("backbone", None), ("fine_tune", None),
             ("fine_tune", "yes")}  # and every "head" edit


def fam_model_dir(world: World, d: Path, draw: Draw, commands=MODEL_COMMANDS) -> Case:
    cmd = draw(st.sampled_from(commands), label="command")
    wd = d / "in" / "wd"
    shutil.copytree(world.wd / "model", wd / "model")
    what = draw(st.sampled_from(["model.json bytes", "model.json content", "checkpoint file", "missing file"]),
                label="what")
    meta = wd / "model" / "model.json"
    if what == "model.json bytes":
        how, strict = corrupt_copy(draw, meta, meta)
    elif what == "model.json content":
        cfg, how, strict = _json_edit(draw, json.loads(meta.read_text()), MODEL_JSON_EDITS,
                                      frozenset(TOLERATED))
        meta.write_text(json.dumps(cfg))
        how = f"model.json: {how}"
        strict = strict and not how.startswith("model.json: 'head'")
    else:
        files = sorted(p for p in (wd / "model").rglob("*") if p.is_file() and p.name != "model.json")
        f = draw(st.sampled_from(files), label="file")
        rel = f.relative_to(wd)
        if what == "missing file":
            f.unlink()
            how, strict = f"{rel} deleted", True
        else:
            how, strict = corrupt_copy(draw, f, f)
            how = f"{rel}: {how.split(': ', 1)[1]}"
        strict = False  # Orbax keeps some files it does not need to restore: judged by the result instead
    argv, outs = _model_command(world, d, cmd, wd)
    case = _case(world, d, f"model.{what.replace(' ', '_')}/{cmd}", argv, "stimage", outs, strict, how)
    if cmd == "predict-jax":  # accepted → it must be the pristine model's prediction, not another one
        case.same_as = (outs[0], world.pred_jax)
    return case


# --- Space Ranger folders ------------------------------------------------------------------------------------

def fam_visium(world: World, d: Path, draw: Draw) -> Case:
    import h5py
    import pandas as pd

    root = d / "in" / "visium"
    shutil.copytree(world.visium, root)
    h5 = root / "filtered_feature_bc_matrix.h5"
    pos = root / "spatial" / "tissue_positions.csv"
    sf = root / "spatial" / "scalefactors_json.json"
    png = root / "spatial" / "tissue_hires_image.png"
    target = draw(st.sampled_from(["h5", "positions", "scalefactors", "image"]), label="file")
    mode = draw(st.sampled_from(["bytes", "content"]), label="mode")
    strict = True
    if mode == "bytes":
        f = {"h5": h5, "positions": pos, "scalefactors": sf, "image": png}[target]
        how, strict = corrupt_copy(draw, f, f)
        if target == "image":
            strict = False  # the reader reads only the image's header; tiling decodes it (and refuses it)
        if target == "positions" and "truncated" in how:
            strict = False  # a truncated CSV may still be a (shorter) valid table
    elif target == "h5":
        kind = draw(st.sampled_from(["shape", "strings", "negative", "nan", "indptr", "no_features", "dup_barcode",
                                     "huge_shape", "names_length"]), label="h5 edit")
        with h5py.File(h5, "r+") as f:
            g = f["matrix"]
            if kind == "shape":
                g["shape"][...] = np.array([2, 2], np.int32)
            elif kind == "huge_shape":
                del g["shape"]
                g["shape"] = np.array([2**31 - 1, 2**31 - 1], np.int64)
            elif kind == "strings":
                v = g["data"][()]
                del g["data"]
                g["data"] = np.array([str(x) for x in v], dtype="S")
            elif kind in ("negative", "nan"):
                v = g["data"][()].astype(np.float64)
                v[0] = -2 if kind == "negative" else np.nan
                del g["data"]
                g["data"] = v
            elif kind == "indptr":
                v = g["indptr"][()]
                v[-1] += 5
                g["indptr"][...] = v
            elif kind == "no_features":
                del g["features"]
            elif kind == "dup_barcode":
                b = g["barcodes"][()]
                b[1] = b[0]
                g["barcodes"][...] = b
            elif kind == "names_length":
                n = g["features"]["name"][()]
                del g["features"]["name"]
                g["features"]["name"] = n[:-1]
        how = f"h5 {kind}"
    elif target == "positions":
        df = pd.read_csv(pos)
        kind = draw(st.sampled_from(["nonnumeric", "empty_row_cell", "dup_barcode", "missing_column", "nan_pixel",
                                     "no_rows", "huge_pixel", "float_array", "unicode_barcode"]), label="csv edit")
        df = df.astype(object)
        if kind == "nonnumeric":
            df.loc[0, "pxl_row_in_fullres"] = "abc"
        elif kind == "empty_row_cell":
            df.loc[1, "array_row"] = ""
        elif kind == "dup_barcode":
            df.loc[1, "barcode"] = df.loc[0, "barcode"]
        elif kind == "missing_column":
            df = df.drop(columns=[draw(st.sampled_from(list(df.columns)), label="column")])
        elif kind == "nan_pixel":
            df.loc[0, "pxl_col_in_fullres"] = np.nan
        elif kind == "no_rows":
            df = df.iloc[:0]
        elif kind == "huge_pixel":
            df.loc[0, "pxl_col_in_fullres"] = 10**15
            strict = False
        elif kind == "float_array":
            df.loc[0, "array_col"] = 1.5
        elif kind == "unicode_barcode":
            df.loc[0, "barcode"] = draw(st.sampled_from(PATH_LIKE), label="barcode")
            strict = False
        df.to_csv(pos, index=False)
        how = f"tissue_positions.csv {kind}"
    elif target == "scalefactors":
        cfg, how, _ = _json_edit(draw, json.loads(sf.read_text()), {
            "spot_diameter_fullres": ["<delete>", 0, -40.0, "40", None, float("nan"), [40]],
            "tissue_hires_scalef": ["<delete>", 0, -0.5, "0.5", None, 1e-300, float("inf")],
        })
        sf.write_text(json.dumps(cfg))
        strict = "= '" not in how and "1e-300" not in how  # a number as a JSON string, a tiny scale: maybe accepted
        how = f"scalefactors_json.json: {how}"
    else:
        import cv2

        kind = draw(st.sampled_from(["blank", "one_pixel", "missing"]), label="image edit")
        if kind == "missing":
            png.unlink()
        else:
            cv2.imwrite(str(png), np.full((150, 200, 3) if kind == "blank" else (1, 1, 3), 255, np.uint8))
            strict = kind == "one_pixel"
        how = f"tissue_hires_image.png {kind}"
    o = d / "out" / "v.h5ad"
    argv = ["--quiet", "read", "visium", str(root), "--out", str(o)]
    return _case(world, d, f"visium.{target}.{mode}/read-visium", argv, "stimage", [o], strict, how)


# --- HER2ST roots -----------------------------------------------------------------------------------------------

def fam_her2st(world: World, d: Path, draw: Draw, commands=("read-her2st", "quickstart")) -> Case:
    import pandas as pd

    cmd = draw(st.sampled_from(commands), label="command")
    shared = d / "in" / "shared"
    root = shared / "data" / "her2st"
    shutil.copytree(world.her2st, root)
    data = root / "data"
    cnt = data / "ST-cnts" / "Z1.tsv.gz"
    sel = data / "ST-spotfiles" / "Z1_selection.tsv"
    lbl = data / "ST-pat" / "lbl" / "Z1_labeled_coordinates.tsv"
    img = data / "ST-imgs" / "Z" / "Z1" / "he.jpg"
    target = draw(st.sampled_from(["counts", "selection", "labels", "image"]), label="file")
    # quickstart goes on to train EfficientNet when the read succeeds: only certain failures there
    mode = "content" if cmd == "quickstart" else draw(st.sampled_from(["bytes", "content"]), label="mode")
    strict = True
    if mode == "bytes":
        f = {"counts": cnt, "selection": sel, "labels": lbl, "image": img}[target]
        how, strict = corrupt_copy(draw, f, f)
        if target in ("selection", "labels"):
            strict = False  # a truncated TSV may still be a (shorter) valid table
        if target == "image":
            strict = False  # the reader reads only the image's header; tiling decodes it (and refuses it)
    elif target == "counts":
        with gzip.open(cnt, "rt") as f:
            lines = f.read().splitlines()
        kind = draw(st.sampled_from(["text", "nan", "negative", "fraction", "huge", "dup_spot", "ragged",
                                     "gene_names", "no_header", "empty", "inf"]), label="counts edit")
        row = draw(st.integers(1, len(lines) - 1), label="row")
        cells = lines[row].split("\t")
        col = draw(st.integers(1, len(cells) - 1), label="column")
        if kind in ("text", "nan", "negative", "fraction", "huge", "inf"):
            cells[col] = {"text": "abc", "nan": "NaN", "negative": "-4", "fraction": "2.5", "huge": "1e40",
                          "inf": "inf"}[kind]
            lines[row] = "\t".join(cells)
        elif kind == "dup_spot":
            lines.append(lines[row])
        elif kind == "ragged":
            lines[row] = "\t".join(cells[:-1])
        elif kind == "gene_names":
            header = lines[0].split("\t")
            header[col] = draw(st.sampled_from([g for g in PATH_LIKE if "\t" not in g and "\n" not in g]),
                               label="gene")
            lines[0] = "\t".join(header)
            strict = False
        elif kind == "no_header":  # the first spot's row becomes the header: unknowable, so tolerated
            lines = lines[1:]
            strict = False
        elif kind == "empty":
            lines = lines[:1]
        with gzip.open(cnt, "wt") as f:
            f.write("\n".join(lines) + "\n")
        how = f"Z1.tsv.gz {kind} (row {row}, column {col})"
    elif target == "selection":
        df = pd.read_csv(sel, sep="\t").astype(object)
        kind = draw(st.sampled_from(["nonnumeric", "missing_column", "nan", "empty", "constant_pixels",
                                     "reversed_pixels"]), label="selection edit")
        if kind == "nonnumeric":
            df.loc[0, "pixel_x"] = "abc"
        elif kind == "missing_column":
            df = df.drop(columns=[draw(st.sampled_from(["x", "y", "pixel_x", "pixel_y", "new_x", "new_y"]))])
        elif kind == "nan":
            df.loc[0, "new_y"] = np.nan
        elif kind == "empty":
            df = df.iloc[:0]
        elif kind == "constant_pixels":
            df["pixel_x"] = 100
            df["pixel_y"] = 100
        elif kind == "reversed_pixels":
            df["pixel_x"] = -df["pixel_x"].astype(float)
        df.to_csv(sel, sep="\t", index=False)
        how = f"Z1_selection.tsv {kind}"
    elif target == "labels":
        df = pd.read_csv(lbl, sep="\t").astype(object)
        kind = draw(st.sampled_from(["nonnumeric", "missing_column", "empty", "unicode_label"]), label="label edit")
        if kind == "nonnumeric":
            df.loc[0, "x"] = "abc"
        elif kind == "missing_column":
            df = df.drop(columns=[draw(st.sampled_from(["x", "y", "label"]))])
        elif kind == "empty":
            df = df.iloc[:0]
            strict = False
        else:
            df.loc[0, "label"] = draw(st.sampled_from(PATH_LIKE))
            strict = False
        df.to_csv(lbl, sep="\t", index=False)
        how = f"Z1_labeled_coordinates.tsv {kind}"
    else:
        kind = draw(st.sampled_from(["missing", "blank"]), label="image edit")
        if kind == "missing":
            img.unlink()
        else:
            import cv2

            cv2.imwrite(str(img), np.full((260, 190, 3), 255, np.uint8))
            strict = False
        how = f"he.jpg {kind}"
    if cmd == "quickstart" and not strict:
        # never let a tolerated read go on to train EfficientNet: make the read fail for sure as well
        with gzip.open(cnt, "at") as f:
            f.write("9x9x9\tabc\n")
        how += " + a counts row with text 'abc'"
        strict = True
    if cmd == "read-her2st":
        o = d / "out" / "h"
        argv = ["--quiet", "read", "her2st", str(root), "--sections", "Z1", "--out", str(o)]
        outs = [o]
    else:
        o = d / "out" / "qs"
        argv = ["--quiet", "quickstart", "--shared", str(shared), "--workdir", str(o), "--sections", "Z1,Z2",
                "--test-section", "Z2", "--backbone", "tiny", "--max-epochs", "1"]
        outs = [o]
    case = _case(world, d, f"her2st.{target}.{mode}/{cmd}", argv, "stimage", outs, strict, how)
    if cmd == "quickstart":  # its documented cache of converted sections (reused when rerun)
        case.allowed_new = [str(o / "data"), str(o / "data" / "*.h5ad")]
    return case


# --- nucleus annotations and cell models ------------------------------------------------------------------

def fam_cell_annotations(world: World, d: Path, draw: Draw) -> Case:
    src = world.cells
    target = draw(st.sampled_from(["xml", "types", "npy"]), label="file")
    mode = draw(st.sampled_from(["bytes", "content"]), label="mode")
    o = d / "out" / "m.json"
    strict = True
    truth, pred = src / "t0_instances.png", src / "t0_instances.png"
    extra: list[str] = []
    if target == "xml":
        x = d / "in" / "t0.xml"
        if mode == "bytes":
            how, strict = corrupt_copy(draw, src / "t0.xml", x, ("truncate", "empty", "garbage", "bitflip"))
            # a truncation that only drops the final newline leaves the XML whole
            strict = strict and x.read_bytes().strip() != (src / "t0.xml").read_bytes().strip()
        else:
            kind = draw(st.sampled_from(["no_region", "no_x", "text_x", "nan_x", "inf_x", "huge_x", "outside",
                                         "laughs", "external_entity", "empty_region", "negative"]), label="xml edit")
            v = '<Vertex X="{x}" Y="10"/><Vertex X="12" Y="12"/><Vertex X="10" Y="14"/>'
            body = {
                "no_region": "<Annotations><Annotation><Regions/></Annotation></Annotations>",
                "no_x": '<Annotations><Regions><Region><Vertices><Vertex Y="1"/></Vertices></Region></Regions></Annotations>',
                "text_x": f"<Annotations><Region><Vertices>{v.format(x='abc')}</Vertices></Region></Annotations>",
                "nan_x": f"<Annotations><Region><Vertices>{v.format(x='nan')}</Vertices></Region></Annotations>",
                "inf_x": f"<Annotations><Region><Vertices>{v.format(x='inf')}</Vertices></Region></Annotations>",
                "huge_x": f"<Annotations><Region><Vertices>{v.format(x='1e300')}</Vertices></Region></Annotations>",
                "negative": f"<Annotations><Region><Vertices>{v.format(x='-1e9')}</Vertices></Region></Annotations>",
                "outside": f"<Annotations><Region><Vertices>{v.format(x='5000')}</Vertices></Region></Annotations>",
                "empty_region": "<Annotations><Region><Vertices></Vertices></Region></Annotations>",
                "laughs": ('<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
                           + "".join(f'<!ENTITY {c} "{("&" + p + ";") * 10}">' for p, c in zip("abcdefg", "bcdefgh"))
                           + ']><Annotations><Region X="&h;"/></Annotations>'),
                "external_entity": ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e SYSTEM "file:///etc/hostname">]>'
                                    '<Annotations><Region><Vertices><Vertex X="&e;" Y="1"/></Vertices></Region>'
                                    "</Annotations>"),
            }[kind]
            x.write_text(body)
            how = f"t0.xml {kind}: {body[:160]}"
        truth = x
    elif target == "types":
        x = d / "in" / "t0_types.csv"
        if mode == "bytes":
            how, strict = corrupt_copy(draw, src / "t0_types.csv", x)
            strict = strict and "truncated" not in how
        else:
            kind = draw(st.sampled_from(["unknown_type", "text_x", "nan_y", "missing_column", "negative_type",
                                         "huge_type", "float_type", "empty"]), label="csv edit")
            rows = {"unknown_type": "x,y,type\n10,10,dragon\n", "text_x": "x,y,type\n abc,10,1\n",
                    "nan_y": "x,y,type\n10,nan,1\n", "missing_column": "x,type\n10,1\n",
                    "negative_type": "x,y,type\n10,10,-1\n", "huge_type": "x,y,type\n10,10,99999999999999999999\n",
                    "float_type": "x,y,type\n10,10,1.5\n", "empty": ""}[kind]
            x.write_text(rows)
            how = f"t0_types.csv {kind}: {rows!r}"
        which = draw(st.sampled_from(["--truth-types", "--pred-types"]), label="which table")
        if which == "--pred-types":
            x2 = x.with_name("p_types.csv")
            text = x.read_bytes()
            x.unlink()
            if mode == "content" and any(k in how for k in ("text_x", "nan_y", "missing_column")):
                strict = False  # a prediction table's x, y are not read (id and type are)
            if mode == "content":  # the same defects in a prediction table (id first)
                lines = text.decode().splitlines()
                text = "\n".join([("id," + ln) if i == 0 and ln else (f"{i}," + ln) if ln else ln
                                   for i, ln in enumerate(lines)]).encode() + b"\n"
            x2.write_bytes(text)
            x = x2
            if mode == "bytes":  # corrupt the prediction's own table instead of the truth's
                how, strict = corrupt_copy(draw, world.cell_pred / "p_types.csv", x)
                strict = False  # a cut or random table may have no 'type' column: "no types", by design
            extra = ["--pred-types", str(x), "--truth-types", str(src / "t0_types.csv")]
        else:
            extra = ["--pred-types", str(world.cell_pred / "p_types.csv"), "--truth-types", str(x)]
        how = f"{which} {how}"
        pred = world.cell_pred / "p.png"
    else:
        x = d / "in" / "pred.npy"
        if mode == "bytes":
            import io

            buf = io.BytesIO()
            import cv2

            np.save(buf, cv2.imread(str(src / "t0_instances.png"), cv2.IMREAD_UNCHANGED).astype(np.int32))
            tmp = d / "in" / "orig.npy"
            tmp.write_bytes(buf.getvalue())
            how, strict = corrupt_copy(draw, tmp, x)
            tmp.unlink()
        else:
            kind = draw(st.sampled_from(["float", "negative", "3d", "object", "huge_ids", "wrong_shape", "bool",
                                         "empty", "nan"]), label="npy edit")
            arr = {"float": np.full((64, 64), 0.5), "negative": -np.ones((64, 64), np.int32),
                   "3d": np.zeros((64, 64, 3), np.int32), "huge_ids": np.full((64, 64), 2**40, np.int64),
                   "wrong_shape": np.zeros((10, 7), np.int32), "bool": np.ones((64, 64), bool),
                   "empty": np.zeros((0, 0), np.int32), "nan": np.full((64, 64), np.nan),
                   "object": np.array([{"a": 1}], dtype=object)}[kind]
            np.save(x, arr, allow_pickle=True)
            how = f"pred.npy {kind}: {arr.dtype} {arr.shape}"
            strict = kind not in ("bool",)
        pred = x
    argv = ["--quiet", "cells", "evaluate", "--pred", str(pred), "--truth", str(truth), "--out", str(o), *extra]
    return _case(world, d, f"cells.{target}.{mode}/cells-evaluate", argv, "stimage", [o], strict, how)


def fam_cells_train(world: World, d: Path, draw: Draw) -> Case:
    """A cell-training folder with a certainly-bad image or annotation (so no training runs)."""
    from world import CELLS_TINY

    folder = d / "in" / "cells"
    shutil.copytree(world.cells, folder)
    target = draw(st.sampled_from(["image", "xml", "instances", "types"]), label="file")
    if target == "image":
        how, _ = corrupt_copy(draw, folder / "t0.png", folder / "t0.png", ("truncate", "empty", "garbage"))
    elif target == "xml":
        (folder / "t0_instances.png").unlink()
        how, _ = corrupt_copy(draw, folder / "t0.xml", folder / "t0.xml", ("empty", "garbage"))
    elif target == "instances":
        (folder / "t0.xml").unlink()
        how, _ = corrupt_copy(draw, folder / "t0_instances.png", folder / "t0_instances.png",
                              ("truncate", "empty", "garbage"))
    else:
        (folder / "t0_types.csv").write_text(draw(st.sampled_from(["x,y,type\n1,1,dragon\n", "x,type\n1,1\n",
                                                                   "x,y,type\nabc,1,1\n"]), label="types"))
        how = f"t0_types.csv: {(folder / 't0_types.csv').read_text()!r}"
    o = d / "out" / "cw"
    argv = ["--quiet", "cells", "train", "--data", str(folder), "--workdir", str(o), "--weights", "none", *CELLS_TINY]
    return _case(world, d, f"cells.train.{target}/cells-train", argv, "stimage", [o], True, f"{target}: {how}")


def fam_cell_model(world: World, d: Path, draw: Draw) -> Case:
    cmd = draw(st.sampled_from(["cells-predict", "cells-export-onnx"]), label="command")
    wd = d / "in" / "cw"
    shutil.copytree(world.cell_wd / "model", wd / "model")
    meta = wd / "model" / "model.json"
    what = draw(st.sampled_from(["model.json bytes", "model.json content", "checkpoint file", "missing file"]),
                label="what")
    strict = True
    if what == "model.json bytes":
        how, strict = corrupt_copy(draw, meta, meta)
    elif what == "model.json content":
        cfg = json.loads(meta.read_text())
        keys = {k: ["<delete>", None, -1, "x", [], {}] for k in cfg}
        cfg, how, _ = _json_edit(draw, cfg, keys)
        meta.write_text(json.dumps(cfg))
        how = f"model.json: {how}"
        strict = False  # some keys are informational
    else:
        files = sorted(p for p in (wd / "model").rglob("*") if p.is_file() and p.name != "model.json")
        f = draw(st.sampled_from(files), label="file")
        if what == "missing file":
            f.unlink()
            how = f"{f.relative_to(wd)} deleted"
        else:
            how, strict = corrupt_copy(draw, f, f)
            how = f"{f.relative_to(wd)}: {how.split(': ', 1)[1]}"
        strict = False  # Orbax keeps files it does not need to restore
    out = d / "out"
    if cmd == "cells-predict":
        o = out / "c.png"
        argv = ["--quiet", "cells", "predict", "--model", str(wd), "--image", str(world.he), "--out", str(o)]
        outs = [o, out / "c_types.csv", out / "c_entropy.npy", out / "c_entropy.png"]
    else:
        o = out / "c.onnx"
        argv = ["--quiet", "cells", "export-onnx", "--model", str(wd), "--out", str(o), "--size", "64"]
        outs = [o]
    return _case(world, d, f"cellmodel.{what.replace(' ', '_')}/{cmd}", argv, "stimage", outs, strict, how)


CELL_MODEL_JSON = {"format": "stimage-jax-cells/1", "backbone": "tiny", "num_types": 5,
                   "type_names": ["background", "immune", "stromal", "cancer_epithelial", "endothelial"],
                   "patch_size": 64, "steps": 1}


def fam_cell_model_json(world: World, d: Path, draw: Draw) -> Case:
    """A cell model folder whose model.json is corrupt (no trained weights needed: every case
    must fail at load, at the latest when the missing checkpoint is restored)."""
    cmd = draw(st.sampled_from(["cells-predict", "cells-export-onnx"]), label="command")
    wd = d / "in" / "cw"
    (wd / "model").mkdir(parents=True)
    meta = wd / "model" / "model.json"
    meta.write_text(json.dumps(CELL_MODEL_JSON))
    if draw(st.booleans(), label="bytes?"):
        how, _ = corrupt_copy(draw, meta, meta)
    else:
        cfg, how, _ = _json_edit(draw, CELL_MODEL_JSON, {k: ["<delete>", None, -1, "x", [], {}, 10**30]
                                                         for k in CELL_MODEL_JSON})
        meta.write_text(json.dumps(cfg))
        how = f"model.json: {how}"
    out = d / "out"
    if cmd == "cells-predict":
        argv = ["--quiet", "cells", "predict", "--model", str(wd), "--image", str(world.he), "--out", str(out / "c.png")]
        outs = [out / "c.png", out / "c_types.csv", out / "c_entropy.npy", out / "c_entropy.png"]
    else:
        argv = ["--quiet", "cells", "export-onnx", "--model", str(wd), "--out", str(out / "c.onnx"), "--size", "64"]
        outs = [out / "c.onnx"]
    return _case(world, d, f"cellmodel.model.json_untrained/{cmd}", argv, "stimage", outs, True,
                 f"model/ with only model.json (no params/): {how}")


# --- clinical tables and cohort slide tables ---------------------------------------------------------------

def _table_edit(draw: Draw, text: str, numeric_cols: list[str]) -> tuple[str, str, bool]:
    """A content defect in a sample-id-first CSV: (new text, how, certainly invalid?)."""
    import io

    import pandas as pd

    df = pd.read_csv(io.StringIO(text), index_col=0, dtype=str)
    kind = draw(st.sampled_from(["nan", "inf", "negative", "text", "huge", "dup_id", "no_overlap", "one_row",
                                 "no_rows", "drop_column", "names", "empty_id", "constant"]), label="table edit")
    r = draw(st.integers(0, len(df) - 1), label="row")
    c = draw(st.sampled_from(numeric_cols), label="column")
    strict = False
    if kind in ("nan", "inf", "negative", "text", "huge"):
        df.iloc[r, df.columns.get_loc(c)] = {"nan": "nan", "inf": "inf", "negative": "-5", "text": "abc",
                                             "huge": "1e308"}[kind]
    elif kind == "dup_id":
        df.index = [df.index[0] if i == r and r else x for i, x in enumerate(df.index)]
        strict = r > 0
    elif kind == "no_overlap":
        df.index = [f"Q{i}" for i in range(len(df))]
        strict = True
    elif kind == "one_row":
        df = df.iloc[:1]
    elif kind == "no_rows":
        df = df.iloc[:0]
        strict = True
    elif kind == "drop_column":
        df = df.drop(columns=[c])
    elif kind == "names":
        name = draw(st.sampled_from(PATH_LIKE), label="name")
        if draw(st.booleans(), label="column?"):
            df = df.rename(columns={c: name})
        else:
            df.index = [name if i == r else x for i, x in enumerate(df.index)]
    elif kind == "empty_id":
        df.index = ["" if i == r else x for i, x in enumerate(df.index)]
    else:
        df[c] = "1"
    buf = io.StringIO()
    df.to_csv(buf)
    return buf.getvalue(), f"{kind} (row {r}, column {c!r})", strict


def fam_clinical(world: World, d: Path, draw: Draw) -> Case:
    """stimage clinical bulk|survival|response on a corrupt table (or expression .h5ad)."""
    cdir = world.clinical
    cmd = draw(st.sampled_from(["bulk", "survival", "response"]), label="command")
    files = {"bulk": ["pred", "bulk"], "survival": ["expr", "clinical"], "response": ["expr", "labels"]}[cmd]
    target = draw(st.sampled_from(files), label="table")
    src = {"pred": cdir / "expr.csv", "bulk": cdir / "bulk.csv", "expr": cdir / "expr.csv",
           "clinical": cdir / "clinical.csv", "labels": cdir / "clinical.csv"}[target]
    if target in ("pred", "expr") and draw(st.booleans(), label="h5ad?"):
        src = cdir / "expr.h5ad"
    x = d / "in" / src.name
    if src.suffix == ".h5ad":
        how, strict = corrupt_copy(draw, src, x, ("truncate", "empty", "garbage", "bitflip"))
    elif draw(st.booleans(), label="bytes?"):
        how, strict = corrupt_copy(draw, src, x)
        strict = strict and ("empty" in how)  # a cut or random CSV may still parse as some table
    else:
        cols = {"clinical": ["time", "event"], "labels": ["response"]}.get(target, ["A", "B", "C", "D", "E"])
        text, how, strict = _table_edit(draw, src.read_text(), cols)
        x.write_text(text)
        how = f"{src.name}: {how}"
    paths = {t: str(x) if t == target else str({"pred": cdir / "expr.csv", "bulk": cdir / "bulk.csv",
                                                 "expr": cdir / "expr.csv", "clinical": cdir / "clinical.csv",
                                                 "labels": cdir / "clinical.csv"}[t]) for t in files}
    o = d / "out" / cmd
    if cmd == "bulk":
        argv = ["--quiet", "clinical", "bulk", "--pred", paths["pred"], "--bulk", paths["bulk"], "--out", str(o)]
    elif cmd == "survival":
        argv = ["--quiet", "clinical", "survival", "--expr", paths["expr"], "--clinical", paths["clinical"], "--time",
                "time", "--event", "event", "--out", str(o), "--folds", "2", "--repeats", "2", "--top", "2"]
    else:
        argv = ["--quiet", "clinical", "response", "--expr", paths["expr"], "--labels", paths["labels"], "--label",
                "response", "--positive", "yes", "--out", str(o)]
    case = _case(world, d, f"clinical.{target}/{cmd}", argv, "stimage", [o], strict, how)
    case.confine = d / "out"
    return case


def fam_cohort(world: World, d: Path, draw: Draw) -> Case:
    """stimage cohort predict with a corrupt slide table, or a table naming a corrupt slide
    (a slide that fails is recorded in the manifest and the exit status is 1, by design)."""
    src = world.clinical / "slides.csv"
    x = d / "in" / "slides.csv"
    kind = draw(st.sampled_from(["bytes", "content", "slide"]), label="what")
    accept = (0,)
    if kind == "bytes":
        how, strict = corrupt_copy(draw, src, x)
        strict = False  # a cut table may still name one valid slide
        accept = (0, 1)
    elif kind == "content":
        edit = draw(st.sampled_from(["no_header", "no_path_column", "empty_path", "dup_id", "bad_id", "mpp_text",
                                     "mpp_negative", "mpp_nan", "no_rows", "not_utf8", "extra_columns"]),
                    label="slide table edit")
        bad_id = draw(st.sampled_from(PATH_LIKE), label="id")
        slide = str(world.slide_tif)
        text = {"no_header": f"A1,{slide},1.0\n", "no_path_column": "slide_id,mpp\nA1,1.0\n",
                "empty_path": "slide_id,path,mpp\nA1,,1.0\n", "dup_id": f"slide_id,path\nA1,{slide}\nA1,{slide}\n",
                "bad_id": f"slide_id,path,mpp\n{bad_id},{slide},1.0\n", "mpp_text": f"slide_id,path,mpp\nA1,{slide},x\n",
                "mpp_negative": f"slide_id,path,mpp\nA1,{slide},-1\n", "mpp_nan": f"slide_id,path,mpp\nA1,{slide},nan\n",
                "no_rows": "slide_id,path,mpp\n", "not_utf8": "slide_id,path\nA\udcff1,x\n",
                "extra_columns": f"slide_id,path,mpp\nA1,{slide},1.0,extra,more\n"}[edit]
        x.write_bytes(text.encode("utf-8", "surrogateescape"))
        how = f"slides.csv {edit}: {text!r}"
        # ids must be "letters, digits, '.', '_' or '-'" (the reader's documented rule), first a letter or digit
        strict = edit != "extra_columns" and not (edit == "bad_id"
                                                  and re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", bad_id))
        if edit == "extra_columns":
            accept = (0, 1)
    else:
        bad = d / "in" / "bad.tif"
        how, _ = corrupt_copy(draw, world.slide_tif, bad, ("truncate", "empty", "garbage"))
        x.write_text(f"slide_id,path,mpp\nA1,{world.slide_tif},1.0\nBAD,{bad},1.0\n")
        how = f"slides.csv naming a good slide and bad.tif = slide.tif {how.split(': ', 1)[1]}"
        strict, accept = False, (1,)  # the bad slide is a recorded failure, exit 1
    o = d / "out" / "cohort"
    argv = ["--quiet", "cohort", "predict", "--model", str(world.onnx), "--slides", str(x), "--out", str(o),
            "--workers", "1"]
    case = _case(world, d, f"cohort.{kind}/cohort-predict", argv, "stimage", [o], strict, how)
    case.accept, case.confine = accept, o
    return case


# --- the command line itself --------------------------------------------------------------------------------

BAD_NUMBERS = ["0", "-1", "abc", "nan", "inf", "-inf", "1e999", "", " ", "1.5", "2**31", "99999999999999999999", "0x10",
               "1e-320", "١"]


def _argv_templates(world: World, d: Path) -> dict[str, tuple[list[str], dict[str, str], list[Path], str]]:
    """name → (argv without the option under test, {option: kind}, outputs, runner)."""
    out = d / "out"
    s2, wd, onnx = str(world.study[2]), str(world.wd), str(world.onnx)
    pred = ["--data", s2, "--out", str(out / "p.h5ad")]
    return {
        "predict": (["predict", "--model", onnx, *pred], {"--batch-size": "pint", "--interval": "frac",
                                                         "--min-coverage": "unit", "--mpp": "pfloat"},
                    [out / "p.h5ad"], "stimage"),
        "export-predict": (["--model", onnx, *pred], {"--batch-size": "pint", "--interval": "frac",
                                                     "--min-coverage": "unit", "--mpp": "pfloat"},
                           [out / "p.h5ad"], "export"),
        "train": (["train", "--data", str(world.study[0]), str(world.study[1]), "--workdir", str(out / "wd"),
                   "--backbone", "tiny", "--genes", "A,B,C", "--max-epochs", "1"],
                  {"--members": "pint", "--lr": "pfloat", "--batch-size": "pint", "--tile-px": "pint",
                   "--tile-um": "pfloat", "--patience": "pint", "--dropout": "unit", "--min-coverage": "unit",
                   "--augment-views": "pint", "--max-epochs": "pint"}, [out / "wd"], "stimage"),
        "benchmark": (["benchmark", "--data", str(world.study[0]), str(world.study[1]), s2, "--workdir",
                       str(out / "b"), "--backbone", "tiny", "--genes", "A,B,C", "--methods", "ridge"],
                      {"--members": "pint", "--lr": "pfloat", "--tile-px": "pint", "--max-epochs": "pint",
                       "--min-coverage": "unit", "--tile-um": "pfloat"}, [out / "b"], "stimage"),
        "segment-nuclei": (["segment-nuclei", "--image", str(world.he), "--out", str(out / "i.png")],
                           {"--mpp": "pfloat"}, [out / "i.png"], "stimage"),
        "explain": (["explain", "--model", onnx, "--tile", str(world.tile), "--gene", "A", "--out", str(out / "ex")],
                    {"--samples": "pint"}, [out / "ex"], "stimage"),
        "cells-evaluate": (["cells", "evaluate", "--pred", str(world.cells / "t0_instances.png"), "--truth",
                            str(world.cells / "t0.xml"), "--out", str(out / "m.json")], {"--radius": "pfloat"},
                           [out / "m.json"], "stimage"),
        "cells-train": (["cells", "train", "--data", str(world.cells), "--workdir", str(out / "cw"), "--backbone",
                         "tiny"], {"--steps": "pint", "--batch-size": "pint", "--lr": "pfloat", "--patch-size": "pint",
                                   "--minutes": "pfloat", "--stride": "pint", "--min-nuclei": "nnint"},
                        [out / "cw"], "stimage"),
        "quickstart": (["quickstart", "--shared", str(d / "in"), "--workdir", str(out / "qs")],
                       {"--members": "pint", "--lr": "pfloat", "--max-epochs": "pint"}, [out / "qs"], "stimage"),
        "predict-jax": (["predict", "--model", wd, *pred], {"--batch-size": "pint", "--interval": "frac"},
                        [out / "p.h5ad"], "stimage"),
        "evaluate": (["evaluate", "--pred", str(world.pred), "--truth", s2, "--out", str(out / "m.csv")], {},
                     [out / "m.csv"], "stimage"),
        "latent": (["latent", "--model", wd, "--data", s2, "--genes", "A", "--out", str(out / "l.png")], {},
                   [out / "l.png"], "stimage"),
        "export-onnx": (["export-onnx", "--model", wd, "--out", str(out / "m.onnx")], {}, [out / "m.onnx"],
                        "stimage"),
        "read-visium": (["read", "visium", str(world.visium), "--out", str(out / "v.h5ad")], {}, [out / "v.h5ad"],
                        "stimage"),
        "read-her2st": (["read", "her2st", str(world.her2st), "--sections", "Z1", "--out", str(out / "h")], {},
                        [out / "h"], "stimage"),
    }


def _invalid(kind: str, value: str) -> bool:
    """Whether ``value`` is certainly refused by an option of ``kind``."""
    try:
        v = float(value) if kind in ("pfloat", "frac", "unit") else int(value)
    except ValueError:
        return True
    if kind in ("pfloat", "frac", "unit") and not np.isfinite(v):
        return True
    return {"pint": v < 1, "nnint": v < 0, "pfloat": v <= 0, "frac": not 0 < v < 1, "unit": not 0 <= v <= 1}[kind]


def fam_argv(world: World, d: Path, draw: Draw) -> Case:
    """A bad option value (always refused), a missing required option, an unknown option, or a bad path."""
    templates = _argv_templates(world, d)
    name = draw(st.sampled_from(sorted(templates)), label="command")
    argv, options, outs, runner = templates[name]
    kind = draw(st.sampled_from(["value", "missing", "unknown", "path"] if options else ["missing", "unknown", "path"]),
                label="argv edit")
    argv = list(argv)
    if kind == "value":
        opt = draw(st.sampled_from(sorted(options)), label="option")
        value = draw(st.sampled_from([v for v in BAD_NUMBERS if _invalid(options[opt], v)]), label="value")
        argv += [opt, value]
        how = f"{opt} {value!r}"
    elif kind == "missing":
        required = ("--model", "--data", "--out", "--workdir", "--image", "--tile", "--gene", "--pred", "--truth",
                    "--shared")
        req = [i for i, a in enumerate(argv) if a in required]
        i = draw(st.sampled_from(req), label="dropped")
        how = f"without {argv[i]}"
        n = 2
        while argv[i + n:] and not argv[i + n].startswith("--"):  # --data takes several values
            n += 1
        del argv[i:i + n]
        if name == "quickstart":  # --shared has a default (the real data): give a missing one instead
            argv += ["--shared", str(d / "nope")]
    elif kind == "unknown":
        opt = draw(st.sampled_from(["--nope", "--out2", "-x", "--overwritee", "-", "--quiet=1"]), label="unknown")
        argv += [opt]
        how = f"unknown argument {opt!r}"
    else:
        # an input that is missing / a folder / a device, or an output in an impossible place
        field = draw(st.sampled_from(["input", "output"]), label="which path")
        flags_in = [i for i, a in enumerate(argv) if a in ("--model", "--data", "--image", "--tile", "--pred",
                                                            "--truth", "--shared", "visium", "her2st")]
        flags_out = [i for i, a in enumerate(argv) if a in ("--out", "--workdir")]
        if field == "input" and flags_in:
            i = draw(st.sampled_from(flags_in), label="flag")
            bad = draw(st.sampled_from([str(d / "nope"), str(d / "in"), "/dev/null", "", "-", "/proc/self/mem",
                                        str(d / "in" / "x.onnx")]), label="path")
        else:
            i = draw(st.sampled_from(flags_out), label="flag")
            # (an empty existing folder would be a valid --workdir / folder --out: not offered)
            bad = draw(st.sampled_from(["/proc/stimage-fuzz/out.h5ad", "/dev/null/x", str(world.study[2]),
                                        str(world.study[0])]), label="path")
        how = f"{argv[i]} {bad!r}"
        argv[i + 1] = bad
        if name == "quickstart":  # a missing --shared is the only certain failure of a quickstart
            argv[argv.index("--shared") + 1] = str(d / "nope")
    if runner == "stimage":
        argv = ["--quiet", *argv]
    else:
        argv = [*argv, "--quiet"]
    return Case(f"argv.{kind}/{name}", argv, runner, inputs=[d / "in", world.root], watch=[d, world.root],
                outputs=outs, strict=True, how=how)


def fam_names(world: World, d: Path, draw: Draw) -> Case:
    """Unicode and path-like gene names where a gene name becomes part of a file name."""
    gene = draw(st.sampled_from(PATH_LIKE[:-1]) | st.text(max_size=6), label="gene")
    cmd = draw(st.sampled_from(["evaluate-uncertainty", "slide-heatmap", "explain", "latent", "train-genes"]),
               label="command")
    out = d / "out"
    if cmd == "evaluate-uncertainty":
        argv = ["--quiet", "evaluate", "--pred", str(world.pred), "--truth", str(world.study[2]), "--out",
                str(out / "m.csv"), "--plot-uncertainty", gene]
        outs, runner = [out / "m.csv"], "stimage"
    elif cmd == "slide-heatmap":
        argv = ["--model", str(world.onnx), "--slide", str(world.slide_tif), "--genes", gene, "--out",
                str(out / "s.h5ad"), "--quiet"]
        outs, runner = [out / "s.h5ad"], "export"
    elif cmd == "explain":
        argv = ["--quiet", "explain", "--model", str(world.onnx), "--tile", str(world.tile), "--gene", gene,
                "--samples", "8", "--out", str(out / "ex")]
        outs, runner = [out / "ex"], "stimage"
    elif cmd == "latent":
        argv = ["--quiet", "latent", "--model", str(world.wd), "--data", str(world.study[2]), "--genes", gene,
                "--out", str(out / "l.png")]
        outs, runner = [out / "l.png"], "stimage"
    else:
        argv = ["--quiet", "train", "--data", str(world.study[0]), str(world.study[1]), "--workdir", str(out / "wd"),
                *TINY_TRAIN[:-4], "--genes", gene]
        outs, runner = [out / "wd"], "stimage"
    # none of these genes is predicted by the model (A, B, C): every case must be refused
    strict = gene.strip() not in ("A", "B", "C", "A,B") and (cmd != "evaluate-uncertainty" or gene.strip(", ") != "")
    if cmd in ("latent", "train-genes", "slide-heatmap") and not [g for g in gene.split(",") if g.strip()]:
        strict = False  # an empty list: the default genes may apply
    return Case(f"names/{cmd}", argv, runner, inputs=[d / "in", world.root], watch=[d, world.root], outputs=outs,
                strict=strict, how=f"gene {gene!r}")


class Family:
    def __init__(self, name: str, make, ci_examples: int, needs_cells: bool = False):
        self.name, self.make, self.ci_examples, self.needs_cells = name, make, ci_examples, needs_cells


FAMILIES = {f.name: f for f in [
    Family("h5ad_bytes", fam_h5ad_bytes, 8),
    Family("h5ad_content", fam_h5ad_content, 8),
    Family("h5ad_train", fam_h5ad_train, 3),
    Family("prediction", fam_prediction, 4),
    Family("image_bytes", fam_image_bytes, 8),
    Family("image_content", fam_image_content, 8),
    Family("onnx", fam_onnx, 10),
    Family("model_dir", fam_model_dir, 6),
    Family("visium", fam_visium, 10),
    Family("her2st", fam_her2st, 8),
    Family("cell_annotations", fam_cell_annotations, 10),
    Family("cells_train", fam_cells_train, 3),
    Family("cell_model", fam_cell_model, 3, needs_cells=True),
    Family("cell_model_json", fam_cell_model_json, 6),
    Family("clinical", fam_clinical, 4),
    Family("cohort", fam_cohort, 6),
    Family("argv", fam_argv, 12),
    Family("names", fam_names, 4),
]}
