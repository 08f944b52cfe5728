"""Spot tiles as a TFDS dataset in ArrayRecord format (``stimage export-dataset``).

One example per spot: ``tile`` (tile_px, tile_px, 3) uint8 RGB (stain-normalised when a
reference is given), ``counts`` (G,) float32 raw counts of the chosen genes, ``sample`` and
``spot`` (text), ``xy`` (2,) float64 full-resolution pixel centre. One split, ``train``, in
input order (shuffling disabled: a sample's spots are one contiguous range, listed in the
dataset's metadata), so readers choose training/validation samples themselves. Tensors are
stored as raw bytes (TFDS ``Encoding.BYTES``): one ``np.frombuffer`` per field when read,
instead of TFDS's default int64 list per pixel (5x slower to decode, 1.7x larger before
compression); datasets written with lists still read (:class:`~data_pipelines.grain_source.ParseSpots`).

Building and reading need ``tensorflow-datasets`` and ``array-record`` (the ``tfds`` extra)
but not TensorFlow: ``tfds.builder_from_directory(DIR).as_data_source("train")`` (or
:func:`open_source`) is a random-access source whose items are dicts of NumPy values, which
``grain`` reads directly (:mod:`data_pipelines.grain_source`). TFDS is imported lazily: this
module stays importable by the JAX-free runtime without it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.io import atomic_dir

__all__ = ["DATASET_NAME", "DATASET_VERSION", "export_dataset", "open_source", "dataset_metadata"]

DATASET_NAME, DATASET_VERSION = "stimage_spots", "1.0.0"
METADATA_FILE = "stimage.json"  # genes, samples and their spot ranges, tile geometry, stain


@functools.cache  # TFDS registers a builder class by name: define it once per process
def _builder_class():
    import tensorflow_datasets as tfds

    class StimageSpots(tfds.core.GeneratorBasedBuilder):
        """Spot tiles, counts, sample ids and coordinates of spatial transcriptomics samples."""

        name = DATASET_NAME
        VERSION = tfds.core.Version(DATASET_VERSION)

        def __init__(self, *, examples, tile_px: int, n_genes: int, **kw):
            self._examples, self._tile_px, self._n_genes = examples, tile_px, n_genes
            super().__init__(**kw)

        def _info(self):
            # DatasetInfo directly: dataset_info_from_configs reads README/citation files next
            # to the builder's code, which a library class does not ship.
            f = tfds.features
            # Raw bytes, not TFDS's default int64/float lists: a uint8 tile as an int64 list is
            # ~1.8 bytes per value on disk and parsed value by value (np.array over a protobuf
            # list: 0.4 ms per 64 px tile, 5x the read); as bytes it is one np.frombuffer.
            raw = f.Encoding.BYTES
            return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=f.FeaturesDict({
                "tile": f.Tensor(shape=(self._tile_px, self._tile_px, 3), dtype=np.uint8, encoding=raw),
                "counts": f.Tensor(shape=(self._n_genes,), dtype=np.float32, encoding=raw),
                "sample": f.Text(), "spot": f.Text(),
                "xy": f.Tensor(shape=(2,), dtype=np.float64, encoding=raw)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield from self._examples()

    return StimageSpots


def export_dataset(adatas: Sequence, genes: Sequence[str], out: str | os.PathLike, *, tile_um: float | None,
                   tile_px: int, stain=None, cache_dir: str | os.PathLike | None = None,
                   progress: bool = True, overwrite: bool = False) -> Path:
    """Write one-sample AnnDatas' spots (tiles via :func:`~data_pipelines.tiles.spot_tiles`)
    as the prepared TFDS version folder ``out`` (with ``dataset_info.json``) → ``out``.

    Built in a temporary sibling and swapped into place: ``out`` is complete or absent.
    """
    import tensorflow_datasets as tfds

    from data_pipelines.tiles import spot_tiles, stain_tag, tile_geometry

    if not progress:
        tfds.disable_progress_bar()
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise StimageError(f"{out} exists; pass --overwrite to replace it")
    genes = list(genes)
    ranges, start = {}, 0
    for a in adatas:
        s = str(a.obs[keys.SAMPLE].iloc[0])
        if s in ranges:
            raise StimageError(f"sample {s!r} appears twice")
        missing = [g for g in genes if g not in a.var_names]
        if missing:
            raise StimageError(f"sample {s!r} lacks gene(s) {', '.join(missing[:5])}")
        ranges[s] = [start, start + a.n_obs]
        start += a.n_obs

    digest = hashlib.sha1(json.dumps(genes).encode())  # content key of every record, for resumable training

    def examples():
        for a in adatas:
            s = str(a.obs[keys.SAMPLE].iloc[0])
            tiles = spot_tiles(a, tile_um=tile_um, tile_px=tile_px, cache_dir=cache_dir, progress=progress,
                               stain=stain)
            x = a[:, genes].X
            counts = (x.toarray() if hasattr(x, "toarray") else np.asarray(x)).astype(np.float32)
            xy = np.asarray(a.obsm[keys.SPATIAL], np.float64)
            for i, spot in enumerate(a.obs_names):
                for part in (s.encode(), str(spot).encode(), np.ascontiguousarray(tiles[i]).tobytes(),
                             counts[i].tobytes(), xy[i].tobytes()):
                    digest.update(part)
                yield f"{ranges[s][0] + i:012d}", {"tile": np.asarray(tiles[i]), "counts": counts[i],
                                                   "sample": s, "spot": str(spot), "xy": xy[i]}

    # the physical tile size actually cut (default: the spot diameter, which must then be common)
    ums = {tile_geometry(a, tile_um, tile_px)["tile_um"] for a in adatas}
    if len(ums) != 1:
        raise StimageError(f"samples have different spot diameters {sorted(ums)} µm; pass --tile-um")
    meta = {"format": "stimage-tfds/1", "genes": genes, "samples": ranges, "tile_um": float(ums.pop()),
            "tile_px": int(tile_px), "stain": stain_tag(stain),
            "stain_reference": None if stain is None else stain.to_dict()}
    with atomic_dir(out) as tmp:
        build = tmp / "_build"
        builder = _builder_class()(examples=examples, tile_px=int(tile_px), n_genes=len(genes),
                                   data_dir=str(build), file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        version = build / DATASET_NAME / DATASET_VERSION
        for f in version.iterdir():
            shutil.move(str(f), tmp / f.name)
        shutil.rmtree(build)
        meta["digest"] = digest.hexdigest()[:16]
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1))
    return out


def dataset_metadata(directory: str | os.PathLike) -> dict:
    """The stimage metadata of an exported dataset (genes, sample ranges, geometry, stain)."""
    path = Path(directory) / METADATA_FILE
    if not (Path(directory) / "dataset_info.json").is_file() or not path.is_file():
        raise StimageError(f"{directory} is not a dataset written by `stimage export-dataset` "
                           "(no dataset_info.json / stimage.json)")
    return json.loads(path.read_text())


def open_source(directory: str | os.PathLike, split: str = "train"):
    """The random-access TFDS data source of an exported dataset (no TensorFlow needed):
    ``len(src)`` spots, ``src[i]`` a dict of NumPy values (``sample``/``spot`` as bytes)."""
    import tensorflow_datasets as tfds

    dataset_metadata(directory)
    return tfds.builder_from_directory(str(Path(directory).absolute())).as_data_source(split)
