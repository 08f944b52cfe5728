"""Cellpose 3 nucleus segmentation of H&E from a model FILE (no weight download), and
training one on MoNuSeg-style tiles from scratch.

Cellpose (Stringer et al. 2021) predicts, per pixel, a "cell probability" and the flow
towards its nucleus's centre; following the flows groups pixels into instances. Its
pretrained weights are fetched from the internet at run time, impossible offline, so here
the user gives the model file (``--cellpose-model PATH``): a cellpose 3 ``CPnet`` state
dict, as ``cellpose.train.train_seg`` (or ``python -m cellpose --train``) saves it, or as
:func:`train_cellpose` / ``stimage cells train-cellpose`` writes it.

Input convention: the network sees one channel, 255 − the mean of R, G, B (nuclei bright on
dark), i.e. cellpose's "grayscale" channels ``[0, 0]`` with ``--invert``: the convention of
its own ``nuclei`` model, so a cellpose-3 nuclei model trained on H&E that way works too.

Scale: cellpose resizes an image so that its nuclei are ``diam_mean`` px across; for that it
needs the nuclei's diameter in the input's pixels. A model trained here stores the µm/px of
its training tiles (key ``stimage_mpp``, a tensor cellpose's own loader ignores) beside
cellpose's ``diam_labels`` (mean training nucleus diameter in px), so a tile of any ``mpp``
is segmented at diameter ``diam_labels · stimage_mpp / mpp`` px. A file without the key is
taken as trained at :data:`~export.runtime.nuclei.DEFAULT_MPP` (0.25 µm/px, 40×).

torch and cellpose are imported lazily (an optional extra; see :data:`INSTALL`). cellpose
4.x is cellpose-SAM (a ~300M-parameter ViT needing torchvision), not usable here: 3.x only.
NumPy + torch + cellpose; no JAX.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipelines.errors import StimageError
from export.runtime.nuclei import DEFAULT_MPP

__all__ = ["INSTALL", "MPP_KEY", "WIDTHS", "CellposeParams", "CellposeNuclei", "cellpose_input",
           "load_cellpose_model", "segment_nuclei_cellpose", "train_cellpose", "check_widths"]

# cellpose 3.1.1.3 declares numpy<2.1, a stale cap (its numba runs on our numpy 2.4): its real
# dependencies come from the extra, cellpose itself without its declared ones.
INSTALL = 'pip install -e ".[cellpose]" && pip install --no-deps cellpose==3.1.1.3'
MPP_KEY = "stimage_mpp"
WIDTHS = (32, 64, 128, 256)  # cellpose 3's CPnet; cellpose's tiling fixes the last at 256 (style vector)
_PROBE = "downsample.down.res_down_{}.conv.conv_0.2.weight"  # (width_i, in, 3, 3): widths from the file


def _cellpose():
    """(torch, cellpose.models, cellpose.resnet_torch, cellpose.train), or one StimageError line."""
    try:
        import cellpose
        import torch
        from cellpose import models, resnet_torch, train
    except ImportError as e:
        raise StimageError(f"--nuclei cellpose needs torch and cellpose 3 ({e.name or e} is not installed): "
                           f"{INSTALL}") from None
    version = getattr(cellpose, "version", "") or ""
    if not str(version).startswith("3."):
        raise StimageError(f"--nuclei cellpose needs cellpose 3.x (classic CPnet), found {version or 'unknown'} "
                           f"(4.x is cellpose-SAM): {INSTALL}")
    return torch, models, resnet_torch, train


@dataclass(frozen=True)
class CellposeParams:
    """Cellpose's mask-building settings (its defaults), plus the classical segmenter's minimum area."""

    flow_threshold: float = 0.4       # cellpose's check of the flows: masks whose flows disagree more are dropped
    cellprob_threshold: float = 0.0   # pixels above this logit are foreground
    min_area_um2: float = 10.0        # as NucleiParams: smaller objects are noise
    batch_size: int = 8               # 224-px tiles per forward pass

    def __post_init__(self) -> None:
        for name in ("flow_threshold", "min_area_um2"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                raise StimageError(f"CellposeParams.{name} = {v} must be a finite number ≥ 0")
        if not np.isfinite(self.cellprob_threshold):
            raise StimageError(f"CellposeParams.cellprob_threshold = {self.cellprob_threshold} must be finite")
        if self.batch_size < 1:
            raise StimageError(f"CellposeParams.batch_size = {self.batch_size} must be ≥ 1")


@dataclass(frozen=True)
class CellposeNuclei:
    """A loaded cellpose 3 model: ``diam_labels`` px at ``mpp`` µm/px is its nucleus size."""

    path: Path
    widths: tuple[int, ...]
    diam_mean: float
    diam_labels: float
    mpp: float
    model: object = field(repr=False, compare=False)  # cellpose.models.CellposeModel

    @property
    def diameter_um(self) -> float:
        return self.diam_labels * self.mpp


def cellpose_input(rgb_uint8: np.ndarray) -> np.ndarray:
    """(H, W) float32 network input of an (H, W, 3) uint8 H&E image: 255 − mean(R, G, B)."""
    rgb = np.asarray(rgb_uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise StimageError(f"cellpose needs an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    return 255.0 - rgb.astype(np.float32).mean(-1)


def load_cellpose_model(path: str | os.PathLike) -> CellposeNuclei:
    """Load a cellpose 3 model file; a missing or unusable file is one StimageError line.

    Checked before cellpose sees it: cellpose would silently fetch its default model for a
    missing path, and loads state dicts with ``strict=False`` (a foreign file would give a
    randomly initialised network).
    """
    path = Path(path)
    if not path.is_file():
        raise StimageError(f"cellpose model {path} not found (cellpose's pretrained weights are downloaded at run "
                           f"time, impossible offline: give a model file, e.g. from `stimage cells train-cellpose`)")
    torch, models, resnet_torch, _ = _cellpose()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file; all mean "not a model"
        msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise StimageError(f"cellpose model {path} is not a readable torch state dict ({msg})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StimageError(f"cellpose model {path} is not a torch state dict of tensors")
    if "W2" in state:
        raise StimageError(f"cellpose model {path} is a cellpose 4 (SAM) model; this needs a cellpose 3 model")
    try:
        widths = tuple(int(state[_PROBE.format(i)].shape[0]) for i in range(4))
        nchan = int(state[_PROBE.format(0)].shape[1])
        diam_mean, diam_labels = float(state["diam_mean"].reshape(-1)[0]), float(state["diam_labels"].reshape(-1)[0])
    except (KeyError, IndexError) as e:
        raise StimageError(f"cellpose model {path} is not a cellpose 3 CPnet (no {e})") from None
    mpp = float(state[MPP_KEY].reshape(-1)[0]) if MPP_KEY in state else DEFAULT_MPP
    if nchan != 2 or widths[-1] != 256:
        raise StimageError(f"cellpose model {path}: {nchan} input channels, widths {widths}; "
                           f"cellpose 3 runs 2 channels and a last width of 256")
    if not all(np.isfinite(v) and v > 0 for v in (diam_mean, diam_labels, mpp)):
        raise StimageError(f"cellpose model {path}: diam_mean {diam_mean}, diam_labels {diam_labels}, "
                           f"mpp {mpp} must be positive")
    net = resnet_torch.CPnet([nchan, *widths], 3, sz=3, mkldnn=False, diam_mean=diam_mean)
    try:
        net.load_state_dict({k: v for k, v in state.items() if k != MPP_KEY}, strict=True)
    except RuntimeError as e:
        raise StimageError(f"cellpose model {path} does not fit cellpose 3's CPnet "
                           f"({str(e).splitlines()[0][:160]})") from None
    net.eval()
    with _quiet_cellpose():
        cp = models.CellposeModel(gpu=False, pretrained_model=False, nchan=nchan, diam_mean=diam_mean, mkldnn=False)
    cp.net = net  # cellpose builds its own 32-64-128-256 net; ours has the file's widths
    cp.diam_mean, cp.diam_labels = diam_mean, diam_labels
    return CellposeNuclei(path=path, widths=widths, diam_mean=diam_mean, diam_labels=diam_labels, mpp=mpp, model=cp)


@contextlib.contextmanager
def _quiet_cellpose():
    # torch warns about sparse tensors inside cellpose's mask building: nothing the user can act on
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        yield


def segment_nuclei_cellpose(rgb_uint8: np.ndarray, *, mpp: float | None = None, model: CellposeNuclei,
                            params: CellposeParams = CellposeParams()) -> np.ndarray:
    """(H, W) int32 nucleus instance map of an (H, W, 3) uint8 H&E image; 0 = background.

    The same call shape as :func:`export.runtime.nuclei.segment_nuclei` plus the model;
    ``mpp`` (µm/px, 0.25 when None) sets cellpose's diameter so nuclei meet the network at
    its training size. Objects under ``params.min_area_um2`` are dropped; ids are 1..N.
    """
    x = cellpose_input(rgb_uint8)
    mpp = DEFAULT_MPP if mpp is None else float(mpp)
    if not (np.isfinite(mpp) and mpp > 0):
        raise StimageError(f"mpp {mpp} must be a positive number of µm per pixel")
    if x.shape[0] < 2 or x.shape[1] < 2 or float(x.max() - x.min()) < 1e-6:
        return np.zeros(x.shape, np.int32)  # cellpose's percentile normalisation of a flat image is 0/0
    diameter = model.diam_labels * model.mpp / mpp
    with _quiet_cellpose():
        masks = model.model.eval(x, channels=[0, 0], diameter=diameter, flow_threshold=params.flow_threshold,
                                 cellprob_threshold=params.cellprob_threshold, min_size=-1,
                                 batch_size=params.batch_size, progress=False)[0]
    masks = np.asarray(masks, np.int64)
    area = np.bincount(masks.ravel())
    keep = area >= params.min_area_um2 / (mpp * mpp)
    keep[0] = False
    lut = np.zeros(len(area), np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[masks]


def check_widths(widths: Sequence[int]) -> tuple[int, ...]:
    """CPnet widths: 4 positive integers, the last 256 (cellpose's tiling sizes the style vector so)."""
    widths = tuple(int(w) for w in widths)
    if len(widths) != 4 or widths[-1] != 256 or min(widths) < 1:
        raise StimageError(f"cellpose widths {widths} must be 4 positive numbers ending in 256")
    return widths


class _EpochBar(logging.Handler):
    """cellpose's trainer has no callback; it logs "<epoch>, train_loss=..." every 5-10 epochs."""

    def __init__(self, bar):
        super().__init__(logging.INFO)
        self.bar = bar

    def emit(self, record):
        m = re.match(r"(\d+), train_loss=([\d.]+)", record.getMessage())
        if m:
            self.bar.update(int(m.group(1)) + 1 - self.bar.n)
            self.bar.set_postfix(loss=float(m.group(2)))


def train_cellpose(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], out: str | os.PathLike, *,
                   mpp: float = DEFAULT_MPP, epochs: int = 100, images_per_epoch: int | None = None,
                   widths: Sequence[int] = WIDTHS, learning_rate: float = 0.005, batch_size: int = 8,
                   bsize: int = 224, diam_mean: float = 30.0, seed: int = 0, overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Train a cellpose 3 CPnet FROM SCRATCH (no pretrained download) and write it to ``out``.

    images: (H, W, 3) uint8 H&E tiles; labels: (H, W) int instance maps (0 = background),
    all at ``mpp`` µm/px (stored in the file). One epoch draws ``images_per_epoch`` random
    ``bsize``-px crops (default: one per image), rotated and rescaled so nuclei are
    ``diam_mean`` px (cellpose's ``train_seg``, AdamW). ``widths`` < :data:`WIDTHS` makes a
    smaller, faster net (the last must stay 256). ``seed`` fixes torch's initialisation;
    cellpose seeds NumPy's global generator per epoch (restored afterwards). The file is
    written atomically; returns {"path", "train_losses" (epochs,), "diam_labels", "mpp", "widths"}.
    """
    from data_pipelines.io import atomic_path, check_writable

    out = check_writable(out, overwrite)
    if len(images) != len(labels) or not images:
        raise StimageError(f"train_cellpose needs as many label maps as images (got {len(images)}, {len(labels)})")
    widths = check_widths(widths)
    if epochs < 1 or batch_size < 1 or bsize < 16 or bsize % 16:
        raise StimageError("train_cellpose needs epochs ≥ 1, batch_size ≥ 1 and bsize a multiple of 16")
    if not (np.isfinite(mpp) and mpp > 0):
        raise StimageError(f"mpp {mpp} must be a positive number of µm per pixel")
    xs = [cellpose_input(im) for im in images]
    ys = []
    for x, y in zip(xs, labels):
        y = np.asarray(y)
        if y.shape != x.shape or not np.issubdtype(y.dtype, np.integer):
            raise StimageError(f"label map {y.shape} {y.dtype} must be integer and match its image {x.shape}")
        ys.append(y.astype(np.int32))
    torch, _, resnet_torch, train = _cellpose()
    from tqdm.auto import tqdm

    from cellpose import dynamics

    np_state = np.random.get_state()
    saved_trange = train.trange, dynamics.trange  # cellpose draws its own bars (flows, diameters), no switch
    if not progress:
        train.trange = dynamics.trange = functools.partial(saved_trange[0], disable=True)
    logger = logging.getLogger("cellpose.train")
    bar = tqdm(total=epochs, desc="cellpose epochs", disable=not progress)
    handler, level = _EpochBar(bar), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with torch.random.fork_rng(), tempfile.TemporaryDirectory(prefix="stimage-cellpose-") as tmp, \
                _quiet_cellpose():
            torch.manual_seed(seed)
            net = resnet_torch.CPnet([2, *widths], 3, sz=3, mkldnn=False, diam_mean=float(diam_mean))
            # min_train_masks=1: a small crop with a few nuclei is still a training example
            path, losses, _ = train.train_seg(net, train_data=xs, train_labels=ys, channels=[0, 0],
                                              n_epochs=int(epochs), batch_size=int(batch_size),
                                              learning_rate=float(learning_rate), save_path=tmp,
                                              model_name="cellpose", nimg_per_epoch=images_per_epoch,
                                              min_train_masks=1, bsize=int(bsize), save_every=10 ** 9)
            state = torch.load(path, map_location="cpu", weights_only=True)
        bar.update(epochs - bar.n)
    finally:
        train.trange, dynamics.trange = saved_trange
        logger.removeHandler(handler)
        logger.setLevel(level)
        bar.close()
        np.random.set_state(np_state)
    state[MPP_KEY] = torch.tensor([float(mpp)])
    with atomic_path(out, overwrite=overwrite) as tmp_out:
        torch.save(state, tmp_out)
    return {"path": out, "train_losses": np.asarray(losses, np.float64),
            "diam_labels": float(state["diam_labels"].reshape(-1)[0]), "mpp": float(mpp), "widths": widths}
