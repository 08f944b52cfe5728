"""Options and helpers every ``stimage`` subcommand shares (as tiatoolbox's
``cli/common.py``): one definition of ``--overwrite``, ``--quiet``, the model option, the
training options (generated from :class:`~stimage_jax.config.RunConfig`, so an option is
declared once, with its default read from the config) and the argument types."""

from __future__ import annotations

import argparse
from pathlib import Path

from export.runtime.options import (nonnegative_int, open_fraction, positive_float, positive_int,  # noqa: F401
                                    unit_fraction)
from stimage_jax.config import AUGMENTATIONS, LOSSES_BY_TARGET, RunConfig, load_config

__all__ = ["csv", "add_overwrite", "common_parent", "add_run_options", "run_config_from_args", "quiet",
           "add_distributed_options", "distributed_from_args",
           "positive_int", "positive_float", "open_fraction", "unit_fraction", "nonnegative_int", "existing_file"]


def csv(s: str | None) -> list[str]:
    """"a, b,,c" → ["a", "b", "c"]; None → []."""
    return [x.strip() for x in s.split(",") if x.strip()] if s else []


def quiet(a) -> bool:
    return bool(getattr(a, "quiet", False))


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"file {text} not found")
    return text


def add_overwrite(p: argparse.ArgumentParser, what: str = "replace existing outputs") -> None:
    p.add_argument("--overwrite", action="store_true", help=what)


def common_parent() -> argparse.ArgumentParser:
    """Options accepted after any subcommand (``--quiet``). SUPPRESS keeps the sub-level
    default from overriding a top-level ``--quiet``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    return common


def _target(text: str) -> str:
    if text not in LOSSES_BY_TARGET:
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(LOSSES_BY_TARGET)})")
    return LOSSES_BY_TARGET[text]


def _choices(values, kind=str):
    names = [str(v) for v in values]

    def parse(text: str):
        if text not in names:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(names)})")
        return kind(text)
    return parse


def add_run_options(p: argparse.ArgumentParser, *, defaults: RunConfig = RunConfig()) -> None:
    """The training options. Each one's ``dest`` is a RunConfig field name and its default
    is SUPPRESS, so only options given on the command line override ``--config``."""
    from data_pipelines.stain_normalisation import METHODS as STAIN_METHODS
    from export.runtime.context import TTA_VIEWS
    from stimage_jax.ensemble.stacked import STRATEGIES
    from stimage_jax.features.registry import BACKBONES

    d, f, t = defaults, defaults.features, defaults.train
    S = argparse.SUPPRESS

    def opt(flag, help, **kw):
        p.add_argument(flag, default=S, help=help, **kw)

    opt("--config", "a Python run config (experiments/configs/NAME.py defining get_config() -> RunConfig); "
        "options given here override it", type=existing_file)
    opt("--genes", f"markers | top-hvg:N | file:PATH | G1,G2,... (default {d.genes})")
    opt("--backbone", "feature extractor(s), comma separated for an FSTimage ensemble, from "
        f"{', '.join(sorted(BACKBONES))} (default efficientnet_lite0, or none with --embeddings)")
    opt("--weights", "pretrained weights (safetensors; .pth with torch installed); one per backbone, comma "
        "separated; 'default' keeps a backbone's shipped weights, 'none' initialises at random")
    opt("--embeddings", "precomputed spot embeddings (UNI, Virchow2, ...): an obsm key, or a folder of "
        "<sample>.npy; trained as one more feature source")
    opt("--members", f"members per feature source (default {d.members})", type=positive_int)
    opt("--task", "regress: NB counts (default); classify: high/low per gene (elastic-net logistic)",
        type=_choices(("regress", "classify")))
    opt("--C", f"--task classify: inverse regularisation strength (default {d.classify.C})", type=positive_float)
    opt("--l1-ratio", f"--task classify: elastic-net mixing (default {d.classify.l1_ratio})", type=unit_fraction)
    opt("--stain", "stain-normalise every tile towards a template (stored with the model, reused at "
        f"prediction): none, {', '.join(STAIN_METHODS)} (default none)", type=_choices(("none", *STAIN_METHODS)))
    opt("--stain-template", "template H&E image for --stain (default: a low-resolution view of the first "
        "training sample's image)", type=existing_file)
    opt("--augment", "training-tile augmentation: default = flips, rot90, affine, blur/noise/HSV/grey; hed = "
        "default + H&E stain jitter", type=_choices(AUGMENTATIONS))
    opt("--augment-views", f"frozen backbone: augmented copies of each training tile (default {f.augment_views})",
        type=positive_int)
    opt("--min-coverage", "leave out spots whose tile is less than this fraction tissue (0 keeps all; "
        f"default {f.min_coverage})", type=unit_fraction)
    opt("--tta", "test-time augmentation: frozen-backbone features averaged over N dihedral views of each tile, "
        f"in training and prediction ({', '.join(map(str, TTA_VIEWS))}; default 8 for a frozen backbone, 1 when "
        "fine-tuning)", type=_choices(TTA_VIEWS, int))
    opt("--smooth", "spatial smoothing stored with the model: each member's predicted mean averaged with its "
        f"neighbours' with this weight (0 = off; default {d.context.smooth})", type=unit_fraction)
    opt("--smooth-k", f"neighbours averaged by --smooth (nearest spots of the same sample; default "
        f"{d.context.smooth_k})", type=positive_int)
    opt("--strategy", "train members at once (vmap) or one by one (loop); auto: loop when fine-tuning on CPU, "
        "else vmap", type=_choices(STRATEGIES))
    p.add_argument("--ensemble-strategy", dest="strategy", default=S, type=_choices(STRATEGIES), help=S)
    opt("--fine-tune", "train the backbone too (slow on CPU)", action="store_const", const=True)
    opt("--dataset", "fine-tune from a dataset written by `stimage export-dataset` (TFDS/ArrayRecord; tiles are "
        "streamed, not held in memory) instead of --data")
    opt("--val-samples", "samples used for early stopping, comma separated (default: the last one)")
    opt("--tile-um", "tile side in µm (default: spot diameter)", type=positive_float)
    opt("--tile-px", f"tile side in px (default {f.tile_px})", type=positive_int)
    opt("--lr", f"learning rate (default {t.lr:g})", type=positive_float)
    opt("--batch-size", f"training batch (default {t.batch_size})", type=positive_int)
    opt("--max-epochs", f"(default {t.max_epochs})", type=positive_int)
    opt("--patience", f"early-stopping patience in epochs (default {t.patience})", type=positive_int)
    p.add_argument("--target", dest="loss", default=S, type=_target,
                   help="counts: NB likelihood of raw counts (STimage, default); log1p: MSE on log1p counts, "
                        "a point-prediction baseline for comparison")
    opt("--dropout", f"dropout on the head's input features (default {d.head.dropout})", type=unit_fraction)
    opt("--seed", f"(default {d.seed})", type=int)


def run_config_from_args(a) -> RunConfig:
    """``--config`` (or the defaults), overridden by every training option given."""
    from stimage_jax.config import flat_fields

    base = load_config(a.config) if getattr(a, "config", None) else RunConfig()
    given = {k: getattr(a, k) for k in flat_fields() if hasattr(a, k)}
    return base.override(**given).check()


def add_distributed_options(p: argparse.ArgumentParser) -> None:
    """Multi-process (multi-host) options: how is separate from what, so these are not RunConfig
    fields and a 2-process run resumes a 1-process one (see :mod:`stimage_jax.distributed`)."""
    g = p.add_argument_group("several processes (hosts)")
    g.add_argument("--coordinator", default=None,
                   help="HOST:PORT of process 0 (env JAX_COORDINATOR_ADDRESS), or 'auto' for JAX's cluster "
                        "auto-detection (SLURM, Open MPI, TPU pods)")
    g.add_argument("--num-processes", type=positive_int, default=None, help="processes in all (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=nonnegative_int, default=None,
                   help="this process's index, 0 .. N-1 (env JAX_PROCESS_ID)")


def distributed_from_args(a):
    from stimage_jax.distributed import DistributedConfig

    return DistributedConfig(getattr(a, "coordinator", None), getattr(a, "num_processes", None),
                             getattr(a, "process_id", None))
