"""The run configuration: one frozen dataclass, built by the CLI or by a Python file.

``RunConfig`` holds everything that decides what a training run computes (task, genes,
members, seed, feature sources and tiles, head, optimisation); it is serialised into the
workdir's ``request.json`` and compared there to decide whether a rerun resumes. The CLI
builds it from its options (:func:`stimage_jax.cli.common.run_config_from_args`); an
experiment file ``experiments/configs/NAME.py`` builds it in Python and
``stimage train --config experiments/configs/NAME.py`` starts from it, with options given
on the command line overriding it (big_vision style)::

    # experiments/configs/her2st_markers.py
    from stimage_jax.config import RunConfig
    def get_config() -> RunConfig:
        return RunConfig(genes="markers", members=5).override(tile_um=100.0)

Nested parts are addressed by their field names alone in :meth:`RunConfig.override`
(``lr``, ``backbone``, ``dropout`` ...): every name is unique across the parts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

from data_pipelines.errors import StimageError
from data_pipelines.tissue import DEFAULT_MIN_COVERAGE
from export.runtime.predictor import TASKS
from stimage_jax.ensemble.train import TrainConfig

__all__ = ["RunConfig", "FeatureConfig", "HeadConfig", "ContextConfig", "ClassifyConfig", "TrainConfig", "AUGMENTATIONS",
           "LOSSES_BY_TARGET", "load_config", "flat_fields"]

AUGMENTATIONS = ("none", "default", "hed")
LOSSES_BY_TARGET = {"counts": "nb", "log1p": "mse_log1p"}  # --target → TrainConfig.loss


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Where features come from and how tiles are made.

    backbone: feature extractors (several: FSTimage), empty with ``embeddings`` only;
    weights: one file per backbone ("default" = shipped weights, "none" = random), or None
    for every backbone's default; embeddings: an obsm key or a folder of <sample>.npy;
    tile_um: tile side in µm (None: the samples' spot diameter); min_coverage: tile QC.
    """

    backbone: tuple[str, ...] | None = None  # None: efficientnet_lite0 unless only embeddings are given
    weights: tuple[str, ...] | None = None
    embeddings: str | None = None
    tile_um: float | None = None
    tile_px: int = 299
    stain: str = "none"
    stain_template: str | None = None
    min_coverage: float = DEFAULT_MIN_COVERAGE
    augment: str = "none"
    augment_views: int = 4
    fine_tune: bool = False
    feature_batch_size: int = 32
    # dihedral views whose features are averaged per tile (1, 4, 8); None: 8 for frozen-backbone
    # regression (issue 21's table), 1 for fine-tuning (which augments instead) and classify
    tta: int | None = None


@dataclasses.dataclass(frozen=True)
class ContextConfig:
    """Spatial context at prediction (issue 21): each member's NB mean is averaged with its
    ``smooth_k`` nearest spots' (same sample) with weight ``smooth`` (0 = off); recorded in
    model.json as the model's default, overridable by ``stimage predict --smooth``."""

    smooth: float = 0.5
    smooth_k: int = 6


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The NB head: hidden units (0 = linear) and dropout on its input features."""

    hidden: int = 0
    dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class ClassifyConfig:
    """``task="classify"``: elastic-net logistic regression per gene (the paper's values)."""

    C: float = 0.1
    l1_ratio: float = 0.5


_PARTS = {"features": FeatureConfig, "head": HeadConfig, "train": TrainConfig, "classify": ClassifyConfig,
          "context": ContextConfig}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that decides what ``stimage train`` computes."""

    task: str = "regress"
    genes: str = "markers"
    members: int = 1
    seed: int = 0
    val_samples: tuple[str, ...] | None = None
    strategy: str = "auto"
    dataset: str | None = None  # an exported TFDS/ArrayRecord dataset folder instead of --data (fine-tuning)
    features: FeatureConfig = FeatureConfig()
    head: HeadConfig = HeadConfig()
    train: TrainConfig = TrainConfig()
    classify: ClassifyConfig = ClassifyConfig()
    context: ContextConfig = ContextConfig()

    def override(self, **flat: Any) -> "RunConfig":
        """A copy with fields replaced by their (unique) names, nested parts included;
        ``None`` leaves a field as it is. Comma-separated strings become tuples where the
        field is a tuple (``backbone="a,b"``)."""
        fields = flat_fields()
        unknown = sorted(k for k in flat if k not in fields)
        if unknown:
            raise StimageError(f"unknown run option(s) {', '.join(unknown)}")
        top, parts = {}, {p: {} for p in _PARTS}
        for k, v in flat.items():
            if v is None:
                continue
            part = fields[k]
            (top if part is None else parts[part])[k] = _coerce(k, v)
        new = dataclasses.replace(self, **top)
        return dataclasses.replace(new, **{p: dataclasses.replace(getattr(new, p), **kv)
                                           for p, kv in parts.items() if kv})

    def check(self) -> "RunConfig":
        """Refuse values no run can use, with one line each; returns self."""
        f = self.features
        if self.task not in TASKS:
            raise StimageError(f"unknown task {self.task!r}; choose from {', '.join(TASKS)}")
        if self.members < 1:
            raise StimageError(f"--members must be >= 1 (got {self.members})")
        if f.augment not in AUGMENTATIONS:
            raise StimageError(f"unknown augmentation {f.augment!r}; choose from {', '.join(AUGMENTATIONS)}")
        if f.augment != "none" and f.augment_views < 1 and not f.fine_tune:
            raise StimageError(f"--augment-views must be >= 1 (got {f.augment_views})")
        if not 0.0 <= f.min_coverage <= 1.0:
            raise StimageError(f"--min-coverage must lie between 0 and 1 (got {f.min_coverage})")
        if f.tile_px < 8 or (f.tile_um is not None and not f.tile_um > 0):
            raise StimageError(f"tiles must be at least 8 px and a positive size in µm (got {f.tile_px} px, "
                               f"{f.tile_um} µm)")
        if not 0.0 <= self.head.dropout < 1.0:
            raise StimageError(f"--dropout must lie in [0, 1) (got {self.head.dropout})")
        t = self.train
        if not (t.lr > 0 and t.batch_size >= 1 and t.max_epochs >= 1 and t.patience >= 1):
            raise StimageError("--lr must be positive and --batch-size, --max-epochs, --patience at least 1")
        if t.loss not in LOSSES_BY_TARGET.values():
            raise StimageError(f"unknown loss {t.loss!r}")
        if self.task == "classify" and (self.members != 1 or f.fine_tune or f.embeddings):
            raise StimageError("--task classify fits one logistic model per gene on frozen backbone features "
                               "(no --members, --fine-tune or --embeddings)")
        if self.dataset is not None and (self.task != "regress" or not f.fine_tune or f.embeddings
                                         or f.stain not in (None, "none")):
            raise StimageError("--dataset streams the exported tiles for --fine-tune (regression); the dataset "
                               "carries its own stain normalisation (no --stain, --embeddings or --task classify)")
        from export.runtime.context import MAX_SMOOTH_K, TTA_VIEWS

        if f.tta is not None and f.tta not in TTA_VIEWS:
            raise StimageError(f"--tta takes {', '.join(map(str, TTA_VIEWS))} views (got {f.tta})")
        if (f.tta or 1) > 1 and (f.fine_tune or self.task != "regress"):
            raise StimageError("--tta averages frozen-backbone features of a regression model; a fine-tuned "
                               "backbone learns from augmented tiles instead, and --task classify has no TTA")
        if not (0.0 <= self.context.smooth <= 1.0 and 1 <= self.context.smooth_k <= MAX_SMOOTH_K):
            raise StimageError(f"--smooth must lie in [0, 1] and --smooth-k in 1..{MAX_SMOOTH_K} "
                               f"(got {self.context.smooth}, {self.context.smooth_k})")
        if not (self.classify.C > 0 and 0.0 <= self.classify.l1_ratio <= 1.0):
            raise StimageError("--C must be positive and --l1-ratio in [0, 1]")
        return self

    @property
    def tta_views(self) -> int:
        """The test-time views this run uses (``features.tta`` with its automatic default)."""
        if self.features.tta is not None:
            return self.features.tta
        return 8 if self.task == "regress" and not self.features.fine_tune else 1

    def to_dict(self) -> dict:
        """JSON-ready (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Inverse of :meth:`to_dict`; keys a newer version added take their defaults."""
        parts = {p: _part_from_dict(kind, d.get(p, {})) for p, kind in _PARTS.items()}
        top = {k: _coerce(k, v) for k, v in d.items() if k not in _PARTS and k in flat_fields()}
        return cls(**top, **parts)


def _part_from_dict(kind, d: dict):
    names = {f.name for f in dataclasses.fields(kind)}
    return kind(**{k: _coerce(k, v) for k, v in d.items() if k in names})


_TUPLES = ("backbone", "weights", "val_samples")


def _coerce(name: str, v):
    if name in _TUPLES and v is not None:
        if isinstance(v, str):
            v = [x.strip() for x in v.split(",") if x.strip()]
        return tuple(v)
    return v


def flat_fields() -> dict[str, str | None]:
    """Field name → the part holding it (None for RunConfig's own fields)."""
    out: dict[str, str | None] = {}
    for f in dataclasses.fields(RunConfig):
        if f.name not in _PARTS:
            out[f.name] = None
    for part, kind in _PARTS.items():
        for f in dataclasses.fields(kind):
            if f.name in out:  # a clash would make override() ambiguous
                raise AssertionError(f"config field {f.name} appears twice")
            out[f.name] = part
    return out


def load_config(path: str | os.PathLike) -> RunConfig:
    """``get_config()`` of a Python config file (big_vision style) → a RunConfig."""
    path = Path(path)
    if not path.is_file():
        raise StimageError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"_stimage_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a user's Python file: report its error in one line
        raise StimageError(f"config file {path} failed to run: {type(e).__name__}: {e}") from None
    get = getattr(module, "get_config", None)
    cfg = get() if callable(get) else None
    if not isinstance(cfg, RunConfig):
        raise StimageError(f"config file {path} must define get_config() returning a RunConfig")
    return cfg
