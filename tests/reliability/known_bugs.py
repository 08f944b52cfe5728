"""The bugs the fuzz suite found, each with its exact reproducer(s).

An open bug (``fixed=None``) runs under ``xfail(strict=True)`` in ``test_known_bugs.py``;
the property tests (``test_fuzz.py``) do not fail on an input whose outcome an open bug
explains (:func:`explained`), so they stay green while it is open and catch anything new.
When a fix lands its reproducer XPASSes (a failure): set ``fixed`` to the commit, and the
reproducer becomes a plain regression test (and stops excusing fuzz outcomes).

Found on main at c7c3c55..4337278 and d178212; fixed so far in 4f79029 and b8015c7.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from harness import ERROR_PREFIX, Case, Outcome

__all__ = ["KNOWN", "KnownBug", "explained", "known_bug", "open_bugs"]


@dataclasses.dataclass
class KnownBug:
    name: str
    reason: str                                      # what goes wrong, the reproducer, the traceback's last line
    reproducers: list[Callable]                      # (world, d) -> Case, each must keep the promise once fixed
    matches: Callable[[Outcome], bool] = lambda o: False   # this bug explains a fuzz outcome
    hangs: bool = False                              # the reproducer never returns: run it in a child with a timeout
    fixed: str | None = None                         # the commit that fixed it: a regression test from then on
    env: dict = dataclasses.field(default_factory=dict)  # environment for the reproducer


def _case(world, d: Path, family: str, argv: list[str], outputs, runner: str = "stimage", how: str = "") -> Case:
    return Case(family, [str(a) for a in argv], runner, inputs=[d / "in", world.root], watch=[d, world.root],
                outputs=list(outputs), strict=True, how=how)


def _h5ad(world, d: Path, edit, name: str = "s2.h5ad") -> Path:
    import anndata as ad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ad.read_h5ad(world.study[2])
        edit(a)
        p = d / "in" / name
        a.write_h5ad(p)
    return p


def _tb(pattern: str, family: str = "") -> Callable[[Outcome], bool]:
    rx = re.compile(pattern)
    return lambda o: (o.traceback is not None and o.case.family.startswith(family) and bool(rx.search(o.traceback)))


def _accepted(family: str, *words: str) -> Callable[[Outcome], bool]:
    """A certainly-bad input of ``family`` accepted (exit 0) — the how names one of ``words``."""
    return lambda o: (o.code == 0 and o.case.strict and o.case.family.startswith(family)
                      and any(w in o.case.how for w in words))


# --- reproducers --------------------------------------------------------------------------------------------

def r_hdf5_hang(world, d):
    """An .h5ad with bytes 2774:3015 zeroed: h5py never returns from reading the root's attributes."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import make_sample  # tests/conftest.py

    p = d / "in" / "s2.h5ad"
    make_sample(d / "in", "s2", seed=2, grid=4).write_h5ad(p)
    b = bytearray(p.read_bytes())
    b[2774:3015] = bytes(3015 - 2774)
    p.write_bytes(bytes(b))
    o = d / "out" / "p.h5ad"
    return _case(world, d, "hang", ["--model", world.onnx, "--data", p, "--out", o, "--quiet"], [o], "export",
                 "make_sample(.., 's2', seed=2, grid=4).write_h5ad(p); bytes 2774:3015 zeroed")


def r_tiny_mpp(world, d):
    p = _h5ad(world, d, lambda a: a.uns["stimage"].__setitem__("mpp", 1e-9))
    o = d / "out" / "p.h5ad"
    return _case(world, d, "repro", ["--quiet", "predict", "--model", world.onnx, "--data", p, "--out", o], [o],
                 how="s2.h5ad with uns['stimage']['mpp'] = 1e-9")


def r_huge_tile_um(world, d):
    import onnx

    m = onnx.load(str(world.onnx))
    for prop in m.metadata_props:
        if prop.key == "tile_um":
            prop.value = "1e30"
    p = d / "in" / "m.onnx"
    onnx.save(m, str(p))
    o = d / "out" / "p.h5ad"
    return _case(world, d, "repro", ["--model", p, "--data", world.study[2], "--out", o, "--quiet"], [o], "export",
                 "model.onnx with metadata tile_um = '1e30'")


def r_cells_pixel_cap(world, d):
    from generators import _huge_tiff_header

    p = d / "in" / "pred.tif"
    p.write_bytes(_huge_tiff_header(10**6, 10**6))
    o = d / "out" / "m.json"
    return _case(world, d, "repro", ["--quiet", "cells", "evaluate", "--pred", p, "--truth",
                                     world.cells / "t0_instances.png", "--out", o], [o],
                 how="a 192-byte TIFF whose IFD claims 10^6 x 10^6 RGB px")


def r_onnx_bigint(world, d):
    import onnx

    m = onnx.load(str(world.onnx))
    for prop in m.metadata_props:
        if prop.key == "tile_px":
            prop.value = "99999999999999999999"
    p = d / "in" / "m.onnx"
    onnx.save(m, str(p))
    o = d / "out" / "p.h5ad"
    return _case(world, d, "repro", ["--model", p, "--data", world.study[2], "--out", o, "--quiet"], [o], "export",
                 "model.onnx with metadata tile_px = '99999999999999999999'")


def _model_json(world, d, edit, cmd="predict"):
    import shutil

    wd = d / "in" / "wd"
    shutil.copytree(world.wd / "model", wd / "model")
    meta = wd / "model" / "model.json"
    edit(meta)
    if cmd == "export-onnx":
        o = d / "out" / "m.onnx"
        argv = ["--quiet", "export-onnx", "--model", wd, "--out", o]
    else:
        o = d / "out" / "p.h5ad"
        argv = ["--quiet", "predict", "--model", wd, "--data", world.study[2], "--out", o]
    return _case(world, d, "repro", argv, [o])


def _json_set(key, value=None, delete=False):
    def edit(meta: Path):
        cfg = json.loads(meta.read_text())
        if delete:
            del cfg[key]
        else:
            cfg[key] = value
        meta.write_text(json.dumps(cfg))
    return edit


def r_model_no_genes(world, d):
    return _model_json(world, d, _json_set("genes", delete=True))


def r_model_four_genes(world, d):
    return _model_json(world, d, _json_set("genes", ["A", "B", "C", "D"]))


def r_model_head_none(world, d):
    return _model_json(world, d, _json_set("head", None))


def r_model_not_utf8(world, d):
    return _model_json(world, d, lambda m: m.write_bytes(b"\xba\x20\xb7"), cmd="export-onnx")


def _cell_model_json(world, d, edit):
    from generators import CELL_MODEL_JSON

    wd = d / "in" / "cw"
    (wd / "model").mkdir(parents=True)
    (wd / "model" / "model.json").write_text(json.dumps(CELL_MODEL_JSON))  # no weights: it fails before them
    edit(wd / "model" / "model.json")
    o = d / "out" / "c.png"
    return _case(world, d, "repro", ["--quiet", "cells", "predict", "--model", wd, "--image", world.he, "--out", o],
                 [o, d / "out" / "c_types.csv", d / "out" / "c_entropy.npy", d / "out" / "c_entropy.png"])


def r_cell_model_not_utf8(world, d):
    return _cell_model_json(world, d, lambda m: m.write_bytes(b"\xba\x20\xb7"))


def r_cell_model_no_backbone(world, d):
    return _cell_model_json(world, d, _json_set("backbone", delete=True))


def r_visium_h5_header(world, d):
    import shutil

    root = d / "in" / "visium"
    shutil.copytree(world.visium, root)
    h5 = root / "filtered_feature_bc_matrix.h5"
    b = bytearray(h5.read_bytes())
    b[69:138] = bytes(69)
    h5.write_bytes(bytes(b))
    o = d / "out" / "v.h5ad"
    return _case(world, d, "repro", ["--quiet", "read", "visium", root, "--out", o], [o],
                 how="filtered_feature_bc_matrix.h5 with bytes 69:138 zeroed")


def _pred_types(world, d, text: str):
    p = d / "in" / "p_types.csv"
    p.write_text(text)
    o = d / "out" / "m.json"
    return _case(world, d, "repro", ["--quiet", "cells", "evaluate", "--pred", world.cell_pred / "p.png", "--truth",
                                     world.cells / "t0_instances.png", "--pred-types", p, "--truth-types",
                                     world.cells / "t0_types.csv", "--out", o], [o], how=f"--pred-types {text!r}")


def r_pred_types_text(world, d):
    return _pred_types(world, d, "id,x,y,type\n1,10,10,dragon\n")


def r_pred_types_nan(world, d):
    return _pred_types(world, d, "id,x,y,type\n1,10,10,\n")


def r_pred_types_negative(world, d):
    return _pred_types(world, d, "id,x,y,type\n1,10,10,-1\n")


def r_xml_nan(world, d):
    p = d / "in" / "t.xml"
    p.write_text('<Annotations><Region><Vertices><Vertex X="nan" Y="10"/><Vertex X="12" Y="12"/>'
                 '<Vertex X="10" Y="14"/></Vertices></Region></Annotations>')
    o = d / "out" / "m.json"
    return _case(world, d, "repro", ["--quiet", "cells", "evaluate", "--pred", world.cells / "t0_instances.png",
                                     "--truth", p, "--out", o], [o], how="a MoNuSeg XML vertex X='nan'")


def r_npy_huge_ids(world, d):
    p = d / "in" / "pred.npy"
    np.save(p, np.full((64, 64), 2**40, np.int64))
    o = d / "out" / "m.json"
    return _case(world, d, "repro", ["--quiet", "cells", "evaluate", "--pred", p, "--truth",
                                     world.cells / "t0_instances.png", "--out", o], [o],
                 how="np.save(pred.npy, np.full((64, 64), 2**40))")


def r_export_argparse(world, d):
    o = d / "out" / "p.h5ad"
    return _case(world, d, "repro", ["--model", world.onnx, "--data", world.study[2], "--out", o, "--batch-size", "0"],
                 [o], "export")


def r_export_multiline(world, d):
    o = d / "out" / "s.h5ad"
    return _case(world, d, "repro", ["--model", world.onnx, "--slide", world.slide_tif, "--genes", "G\nH", "--out", o,
                                     "--quiet"], [o], "export")


def r_benchmark_proc(world, d):
    return _case(world, d, "repro", ["--quiet", "benchmark", "--data", *world.study, "--workdir",
                                     "/proc/stimage-fuzz/wd", "--backbone", "tiny", "--genes", "A,B,C",
                                     "--methods", "ridge"], [])


def r_cells_train_file_workdir(world, d):
    (d / "in" / "file").write_text("x")
    return _case(world, d, "repro", ["--quiet", "cells", "train", "--data", world.cells, "--workdir",
                                     d / "in" / "file", "--backbone", "tiny"], [])


def r_latent_no_genes(world, d):
    o = d / "out" / "l.png"
    return _case(world, d, "repro", ["--quiet", "latent", "--model", world.wd, "--data", world.study[2], "--genes",
                                     ",", "--out", o], [o])


def r_quickstart_one_section(world, d):
    import shutil

    shutil.copytree(world.her2st, d / "in" / "shared" / "data" / "her2st")
    o = d / "out" / "qs"
    case = _case(world, d, "repro", ["--quiet", "quickstart", "--shared", d / "in" / "shared", "--workdir", o,
                                     "--sections", "Z1", "--test-section", "Z1", "--backbone", "tiny"], [o])
    case.allowed_new = [str(o / "data"), str(o / "data" / "*.h5ad")]
    return case


def r_libpng_line(world, d):
    p = d / "in" / "he.png"
    b = bytearray(world.he.read_bytes())
    i = b.index(b"IDAT") + 8  # inside the compressed pixels: zlib's check fails
    b[i:i + 64] = bytes(64)
    p.write_bytes(bytes(b))
    o = d / "out" / "i.png"
    return _case(world, d, "repro", ["--quiet", "segment-nuclei", "--image", p, "--out", o], [o],
                 how="he.png with 64 bytes after 'IDAT'+4 zeroed")


def r_opencv_log_line(world, d):
    p = d / "in" / "pred.png"
    p.write_bytes((world.cells / "t0_instances.png").read_bytes()[:15])
    o = d / "out" / "m.json"
    return _case(world, d, "repro", ["--quiet", "cells", "evaluate", "--pred", p, "--truth",
                                     world.cells / "t0_instances.png", "--out", o], [o],
                 how="an instance-map PNG truncated to 15 bytes")


def r_tifffile_log_line(world, d):
    p = d / "in" / "slide.tif"
    b = bytearray(world.slide_tif.read_bytes())
    b[74:148] = bytes(74)
    p.write_bytes(bytes(b))
    o = d / "out" / "s.h5ad"
    return _case(world, d, "repro", ["--model", world.onnx, "--slide", p, "--out", o, "--quiet"], [o], "export",
                 how="slide.tif with bytes 74:148 zeroed (tag entries of the first IFD)")


def r_warning_before_error(world, d):
    import anndata as ad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ad.read_h5ad(world.pred)
        a.var_names = ["A"] * a.n_vars
        p = d / "in" / "pred.h5ad"
        a.write_h5ad(p)
    o = d / "out" / "m.csv"
    return _case(world, d, "repro", ["--quiet", "evaluate", "--pred", p, "--truth", world.study[2], "--out", o], [o],
                 how="pred.h5ad with var_names A, A, A")


def r_clinical_nan(world, d):
    p = d / "in" / "expr.csv"
    text = (world.clinical / "expr.csv").read_text().splitlines()
    cells = text[1].split(",")
    cells[1] = "nan"
    text[1] = ",".join(cells)
    p.write_text("\n".join(text) + "\n")
    o = d / "out" / "r"
    return _case(world, d, "repro", ["--quiet", "clinical", "response", "--expr", p, "--labels",
                                     world.clinical / "clinical.csv", "--label", "response", "--positive", "yes",
                                     "--out", o], [o], how="expr.csv with sample P00, gene A = nan")


def r_clinical_h5ad(world, d):
    p = d / "in" / "expr.h5ad"
    b = bytearray((world.clinical / "expr.h5ad").read_bytes())  # byte-identical in every world
    b[13170 // 8] ^= 1 << (13170 % 8)
    p.write_bytes(bytes(b))
    o = d / "out" / "b"
    return _case(world, d, "repro", ["--quiet", "clinical", "bulk", "--pred", p, "--bulk",
                                     world.clinical / "bulk.csv", "--out", o], [o],
                 how="expr.h5ad with bit 13170 flipped")


def _slides(world, d, data: bytes, how: str):
    p = d / "in" / "slides.csv"
    p.write_bytes(data)
    o = d / "out" / "cohort"
    case = _case(world, d, "repro", ["--quiet", "cohort", "predict", "--model", world.onnx, "--slides", p, "--out", o,
                                     "--workers", "1"], [o], how=how)
    case.confine = o
    return case


def r_cohort_not_utf8(world, d):
    return _slides(world, d, b"slide_id,path\nA\xff1,x.tif\n", "slides.csv with byte 0xff in an id")


def r_cohort_nul(world, d):
    return _slides(world, d, f"slide_id,path\nA1,{world.slide_tif}\x00x\n".encode(), "a NUL byte in a slide path")


def r_model_no_backbone(world, d):
    return _model_json(world, d, _json_set("backbone", delete=True))


def r_model_head_negative(world, d):
    import shutil

    wd = d / "in" / "wd"
    shutil.copytree(world.wd / "model", wd / "model")
    _json_set("head", {"hidden": -1})(wd / "model" / "model.json")
    o = d / "out" / "l.png"
    return _case(world, d, "repro", ["--quiet", "latent", "--model", wd, "--data", world.study[2], "--genes", "A",
                                     "--out", o], [o], how="model.json 'head' = {'hidden': -1}")


def r_cell_model_backbone_list(world, d):
    return _cell_model_json(world, d, _json_set("backbone", []))


def r_truth_types_nan(world, d):
    p = d / "in" / "t_types.csv"
    p.write_text("x,y,type\n10,10,\n")
    o = d / "out" / "m.json"
    return _case(world, d, "repro", ["--quiet", "cells", "evaluate", "--pred", world.cell_pred / "p.png", "--truth",
                                     world.cells / "t0_instances.png", "--pred-types",
                                     world.cell_pred / "p_types.csv", "--truth-types", p, "--out", o], [o],
                 how="--truth-types 'x,y,type\\n10,10,\\n' (an empty type)")


def r_her2st_constant_pixels(world, d):
    import shutil

    import pandas as pd

    root = d / "in" / "her2st"
    shutil.copytree(world.her2st, root)
    sel = root / "data" / "ST-spotfiles" / "Z1_selection.tsv"
    df = pd.read_csv(sel, sep="\t")
    df["pixel_x"], df["pixel_y"] = 100, 100
    df.to_csv(sel, sep="\t", index=False)
    o = d / "out" / "h"
    return _case(world, d, "repro", ["--quiet", "read", "her2st", root, "--sections", "Z1", "--out", o], [o],
                 how="Z1_selection.tsv with pixel_x = pixel_y = 100 for every spot")


# --- stray stderr lines around the one error line ----------------------------------------------------------

_CLIB = re.compile(r"^(libpng (error|warning)|\[ ?(ERROR|WARN|INFO):\d|TIFF\w*: |Corrupt JPEG|Premature end of JPEG)")
_TIFFFILE = re.compile(r"^((ERROR|WARNING) )?<(tifffile\.|TiffTag|TiffPage|TiffFile|TiffFrame)")
_PYWARN = re.compile(r"^\S.*:\d+: [A-Za-z]*Warning: ")
_PROGRESS = re.compile(r"^\s*\d+%\|")


def stray_lines(o: Outcome) -> list[str] | None:
    """The classes of extra stderr lines when they are all that is wrong, else None."""
    if o.code != 2 or o.traceback or o.partial or o.changed_inputs or o.different_result:
        return None
    lines = o.error_lines
    if sum(ln.startswith(ERROR_PREFIX) for ln in lines) != 1 or len(lines) == 1:
        return None
    classes, after_warning = set(), False
    for ln in lines:
        if ln.startswith(ERROR_PREFIX):
            after_warning = False
        elif _CLIB.search(ln):
            classes.add("stray-c-library-lines")
        elif _TIFFFILE.search(ln):
            classes.add("stray-tifffile-log-lines")
        elif _PYWARN.search(ln):
            classes.add("warning-lines-before-error")
            after_warning = True
        elif after_warning and ln.startswith("  "):  # the source line a warning quotes
            continue
        elif _PROGRESS.search(ln):
            classes.add("progress-bar-despite-quiet")
        else:
            return None
    return sorted(classes)


def _stray(cls: str) -> Callable[[Outcome], bool]:
    return lambda o: cls in (stray_lines(o) or [])


def open_bugs() -> list:
    return [b for b in KNOWN if not b.fixed]


KNOWN: list[KnownBug] = [
    KnownBug("hdf5-hang",
             "a .h5ad with a zeroed run of bytes makes h5py loop forever reading attributes (anndata.read_h5ad in "
             "data_pipelines.slides.read_h5ad): the command never returns. Repro: make_sample(d,'s2',seed=2,grid=4)"
             ".write_h5ad(p); bytes 2774:3015 zeroed; python -m export.predict --model M.onnx --data p --out o",
             [r_hdf5_hang], hangs=True, fixed="4f79029", env={"STIMAGE_HDF5_CHECK_SECONDS": "2"},
             matches=lambda o: o.code == -1000 and o.case.family.startswith(("h5ad.bytes", "prediction/bytes"))),
    KnownBug("absurd-tile-crop",
             "the crop side tile_um/mpp is not bounded: mpp 1e-9 in uns['stimage'] → 'ValueError: array is too big' "
             "(predict/latent/explain); ONNX tile_um '1e30' → 'ValueError: Maximum allowed dimension exceeded'",
             [r_tiny_mpp, r_huge_tile_um],
             matches=_tb(r"array is too big|Unable to allocate|Maximum allowed dimension|MemoryError"), fixed="4f79029"),
    KnownBug("cells-evaluate-pixel-cap",
             "stimage cells evaluate --pred HUGE.tif (192-byte TIFF claiming 10^6 x 10^6 px): read_instances calls "
             "cv2.imread without the pixel cap → 'cv2.error: ... pixels <= CV_IO_MAX_IMAGE_PIXELS ...'",
             [r_cells_pixel_cap], matches=_tb(r"CV_IO_MAX_IMAGE_PIXELS"), fixed="4f79029"),
    KnownBug("onnx-tile-px-bigint",
             "ONNX metadata tile_px '99999999999999999999': onnx_model._number → np.isfinite(int) → "
             "\"TypeError: ufunc 'isfinite' not supported for the input types\"",
             [r_onnx_bigint], matches=_tb(r"ufunc 'isfinite'"), fixed="4f79029"),
    KnownBug("model-json-unvalidated",
             "EnsembleModel.load checks only JSON syntax and 'format' of model.json: no 'genes' → KeyError: 'genes'; "
             "4 genes for 3 outputs → ValueError (anndata var rows); 'head': null → TypeError (NBHead() argument "
             "after **); non-UTF-8 bytes via export-onnx → UnicodeDecodeError; bad sources/member_sources/tile_px "
             "→ KeyError/ValueError/TypeError; 'genes': 'A,B,C' or 4 genes accepted by explain/export-onnx",
             [r_model_no_genes, r_model_four_genes, r_model_head_none, r_model_not_utf8],
             matches=lambda o: o.case.family.startswith("model.model.json") and (
                 o.traceback is not None or (o.code == 0 and o.case.strict)), fixed="4f79029"),
    KnownBug("cell-model-json-unvalidated",
             "CellModel.load: model.json not UTF-8 → UnicodeDecodeError; 'backbone'/'num_types' missing → KeyError; "
             "'num_types': 'x' → TypeError ('<' not supported)",
             [r_cell_model_not_utf8, r_cell_model_no_backbone],
             matches=lambda o: o.case.family.startswith("cellmodel.model.json") and o.traceback is not None, fixed="4f79029"),
    KnownBug("visium-h5-object-header",
             "read visium with filtered_feature_bc_matrix.h5 bytes 69:138 zeroed: h5py raises KeyError('Unable to "
             "synchronously open object (bad object header version number)'), which read_10x_h5 does not catch",
             [r_visium_h5_header], matches=_tb(r"^KeyError: .Unable to", "visium.h5"), fixed="4f79029"),
    KnownBug("pred-types-unvalidated",
             "cells evaluate --pred-types is read without checks (outputs._pred_types): type 'dragon' → ValueError: "
             "invalid literal for int(); an empty type → ValueError: cannot convert float NaN; 99999999999999999999 "
             "→ OverflowError; -1 / 1.5 / NaN coordinates accepted (exit 0)",
             [r_pred_types_text, r_pred_types_nan, r_pred_types_negative],
             matches=lambda o: o.case.family.startswith("cells.types") and "--pred-types" in o.case.how and (
                 o.traceback is not None or (o.code == 0 and o.case.strict)), fixed="4f79029"),
    KnownBug("xml-nonfinite-vertex",
             "a MoNuSeg XML vertex X='nan' (or 'inf') is accepted: the bounds check compares NaN as False, "
             "np.round(nan).astype(int32) warns (RuntimeWarning on stderr) and rasterises garbage; exit 0",
             [r_xml_nan], matches=_accepted("cells.xml.content", "nan_x", "inf_x"), fixed="4f79029"),
    KnownBug("instance-ids-overflow",
             "an instance-map .npy with ids >= 2**31 is silently wrapped by read_instances' astype(int32) (exit 0, "
             "metrics of a different map)",
             [r_npy_huge_ids], matches=_accepted("cells.npy.content", "huge_ids"), fixed="4f79029"),
    KnownBug("export-predict-cli-format",
             "python -m export.predict uses plain argparse (usage block + 'python -m export.predict: error: ...', "
             "SystemExit) and prints str(e) whole (a gene 'G\\nH' gives two lines); stimage's one-line format applies "
             "to the stimage command only",
             [r_export_argparse, r_export_multiline],
             matches=lambda o: o.case.runner == "export" and o.code == 2 and not o.traceback and (
                 "usage: python -m export.predict" in o.stderr or "\\n" in o.case.how), fixed="4f79029"),
    KnownBug("output-folder-not-checked",
             "benchmark --workdir /proc/x → FileNotFoundError; explain --out /proc/x → FileNotFoundError (after "
             "LIME ran); cells train --workdir /dev/null/x → NotADirectoryError, --workdir FILE → FileExistsError",
             [r_benchmark_proc, r_cells_train_file_workdir],
             matches=_tb(r"^(FileNotFoundError|NotADirectoryError|FileExistsError|IsADirectoryError|PermissionError)",
                         "argv.path/"), fixed="4f79029"),
    KnownBug("latent-empty-gene-list",
             "stimage latent --genes ',' (or '') → 'ValueError: Number of columns must be a positive integer, not 0'",
             [r_latent_no_genes], matches=_tb(r"Number of columns must be a positive integer", "names/latent"), fixed="4f79029"),
    KnownBug("quickstart-no-training-section",
             "stimage quickstart --sections Z1 --test-section Z1 (no section left to train on) → IndexError: list "
             "index out of range (train_secs[-1] in cli/quickstart.py)",
             [r_quickstart_one_section], matches=lambda o: False, fixed="4f79029"),
    KnownBug("clinical-nonfinite-expression",
             "stimage clinical survival/response/bulk do not check that expression values are finite: a NaN → "
             "'TypeError: NaNs were detected in the dataset' (lifelines) / 'ValueError: Input X contains NaN.' "
             "(scikit-learn); 1e308 → ConvergenceError / 'The dual coefficients or intercepts are not finite'",
             [r_clinical_nan], matches=_tb(r"NaN|not finite|Convergence|infinity|too large", "clinical"), fixed="b8015c7"),
    KnownBug("clinical-h5ad-unguarded",
             "export.clinical.tables.read_expr calls anndata.read_h5ad without catching: a truncated or bit-flipped "
             "expression .h5ad (bit 13170 of the fixture flipped) → anndata's multi-line read error / "
             "RuntimeError: Can't synchronously determine if attribute exists (h5py)",
             [r_clinical_h5ad], matches=lambda o: (o.traceback is not None and o.case.family.startswith("clinical")
                                                   and "h5ad" in o.case.how), fixed="b8015c7"),
    KnownBug("cohort-slide-table-bytes",
             "cohort predict: a slides.csv that is not UTF-8 → UnicodeDecodeError (read_slide_table opens it as "
             "text without a guard); a NUL byte in a path → 'ValueError: embedded null byte'",
             [r_cohort_not_utf8, r_cohort_nul], matches=_tb(r"UnicodeDecodeError|embedded null byte", "cohort"), fixed="b8015c7"),
    KnownBug("model-json-incomplete",
             "EnsembleModel.load (after 4f79029) still trusts some of model.json: no 'backbone' → KeyError: "
             "'backbone' (stimage predict --model W); 'head': {'hidden': -1} → TypeError: Only non-negative indices "
             "are allowed when broadcasting static shapes (stimage latent)",
             [r_model_no_backbone, r_model_head_negative],
             matches=lambda o: o.case.family.startswith("model.model.json") and o.traceback is not None,
             fixed="4adf440"),
    KnownBug("cell-model-json-types",
             "CellModel.load (after 4f79029) checks keys, not their types: 'backbone': [] → TypeError: unhashable "
             "type: 'list' (cells predict/export-onnx); with a trained model, 'type_names' deleted / None / [] / -1 "
             "→ KeyError / TypeError / IndexError",
             [r_cell_model_backbone_list],
             matches=lambda o: o.case.family.startswith("cellmodel.model.json") and o.traceback is not None,
             fixed="4adf440"),
    KnownBug("truth-types-empty-type",
             "stimage cells evaluate --truth-types T.csv where a row's type is empty (or the CSV is cut mid-row): "
             "read_type_table → _type_id(nan) → 'ValueError: cannot convert float NaN to integer'",
             [r_truth_types_nan],
             matches=lambda o: (o.case.family.startswith("cells.types") and "--truth-types" in o.case.how
                                and o.traceback is not None and "NaN" in o.traceback), fixed="4adf440"),
    KnownBug("her2st-degenerate-pixel-fit",
             "read her2st with every selection pixel at (100, 100): the fitted px per array unit is ~1e-14, not "
             "<= 0, so the reader accepts it and writes uns['stimage']['mpp'] = 6.6e15 (exit 0); expected the "
             "'pixel coordinates do not grow with array coordinates' error",
             [r_her2st_constant_pixels], matches=_accepted("her2st.selection.content", "constant_pixels"),
             fixed="4adf440"),
    KnownBug("stray-c-library-lines",
             "libpng and OpenCV write to fd 2 besides the error: a corrupt PNG adds 'libpng error: IDAT: incorrect "
             "data check' (or 'bad adaptive filter value'); a truncated PNG adds '[ERROR:0@..] global "
             "grfmt_png.cpp:297 readHeader IHDR chunk shall be first'; a float TIFF adds '[ WARN:0@..] ... "
             "TIFFRGBAImageOK'",
             [r_libpng_line, r_opencv_log_line], matches=_stray("stray-c-library-lines"), fixed="4f79029"),
    KnownBug("stray-tifffile-log-lines",
             "tifffile logs through logging (e.g. 'ERROR <TiffTag.fromfile> raised TiffFileError(...)') before "
             "the error line on a corrupt TIFF",
             [r_tifffile_log_line], matches=_stray("stray-tifffile-log-lines"), fixed="4f79029"),
    KnownBug("warning-lines-before-error",
             "Python warnings are printed before the error: anndata's 'Variable names are not unique' (evaluate "
             "--pred with duplicate genes), the HER2ST reader's 'N of M counted spot(s) ... dropped' (then '0 counted "
             "spot(s) found')",
             [r_warning_before_error], matches=_stray("warning-lines-before-error"), fixed="4f79029"),
    KnownBug("progress-bar-despite-quiet",
             "stimage --quiet explain (LIME) still draws lime's progress bar on stderr",
             [], matches=_stray("progress-bar-despite-quiet"), fixed="4f79029"),
]


def known_bug(case: Case) -> str | None:
    """An input that must not be run in-process (none can be recognised before running yet:
    hangs are caught by the watchdog instead)."""
    return None


def explained(o: Outcome) -> list[str]:
    """The documented bugs that account for every broken promise of ``o`` ([] = none do)."""
    if not o.violations() or o.partial or o.changed_inputs or o.different_result:
        return []  # a file left behind, an input modified or a silently different result is never excused
    names = {b.name for b in open_bugs()}
    stray = stray_lines(o)
    if stray:
        return stray if set(stray) <= names else []
    return [b.name for b in open_bugs() if b.matches(o)][:1]
