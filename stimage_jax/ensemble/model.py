"""A trained ensemble on disk and in memory.

``WORKDIR/model/`` holds ``model.json`` (genes, feature sources, tile geometry, training
provenance), ``backbone_<source>/`` (each frozen backbone's state, so a model never
depends on where its pretrained weights file lived) and ``members_<source>/`` (the
members of each feature source stacked on a leading axis: heads on a frozen backbone or
on precomputed embeddings, or whole networks when fine-tuned).

Feature sources (FSTimage): ``{"name", "kind": "backbone"|"embeddings", "num_features",
"backbone"?, "key"?}``; ``member_sources[m]`` names member m's source. All members are
equal-weight components of one NB mixture whatever their source.
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from data_pipelines.errors import StimageError
from data_pipelines.io import atomic_dir
from export.runtime.predictor import REGRESS, read_model_json, resolve_model_dir
from stimage_jax import __version__
from stimage_jax.features.registry import create_backbone
from stimage_jax.nb.distribution import params_from_logits
from stimage_jax.nb.head import NBHead
from stimage_jax.training.checkpoint import verify_digests, write_digests

__all__ = ["STimageNet", "EnsembleModel", "MODEL_FORMAT", "build_member", "forward", "heads_forward",
           "model_provenance"]

MODEL_FORMAT = "stimage-jax/2"


def model_provenance(cfg: dict) -> dict:
    """What a prediction records about the model that made it (model.json → uns; the same
    dict goes into an exported model's metadata)."""
    return {"backbone": cfg["backbone"], "genes": cfg["genes"], "tile_um": cfg["tile_um"],
            "tile_px": cfg["tile_px"], "members": cfg["members"], "fine_tune": cfg["fine_tune"],
            "model_version": cfg["version"], "version": __version__, "training_samples": cfg["training_samples"],
            "nb_parameterisation": cfg["nb_parameterisation"], "target": cfg["train"]["loss"],
            "stain": (cfg.get("stain") or {}).get("method", "none")}


def _point_params(log1p_pred, _unused):
    """A log1p-MSE model predicts a point, not a distribution: mean expm1(out), r = inf."""
    return jnp.expm1(jnp.maximum(log1p_pred, 0.0)), jnp.full_like(log1p_pred, jnp.inf)


def heads_forward(members, member_sources, point: bool, feats: dict, tiles=None):
    """Every member's NB parameters → (mu, r), each (M, B, G).

    feats: (B, D_s) features by source name (the frozen backbones' outputs or precomputed
    embeddings); a member whose source has no features (a fine-tuned network) reads
    ``tiles`` (B, H, W, 3) uint8. Members run in a Python loop, never ``vmap``: jax2onnx
    exports ``vmap`` over convolutions with wrong numbers, and on CPU a loop is faster.
    """
    to_params = _point_params if point else params_from_logits
    mus, rs = [], []
    for mem, src in zip(members, member_sources):
        mu, r = to_params(*(mem(feats[src]) if src in feats else mem(tiles)))
        mus.append(mu)
        rs.append(r)
    return jnp.stack(mus), jnp.stack(rs)


def forward(backbones: dict, members, member_sources, point: bool, tiles, tta: int = 1):
    """uint8 tiles (B, H, W, 3) → (mu, r), each (M, B, G): THE forward pass. Each frozen
    backbone runs once per test-time view (``tta`` dihedral views, features averaged) and all
    its heads reuse its features. ``EnsembleModel.params`` runs it in batches (features
    cached); ``export.to_onnx`` traces it into the graph."""
    from stimage_jax.features.tta import tta_backbone

    feats = {name: tta_backbone(bb, tiles, tta) for name, bb in backbones.items()}
    return heads_forward(members, member_sources, point, feats, tiles)


@partial(nnx.jit, static_argnums=(1, 2))
def _heads_jit(members, member_sources, point, feats, tiles):
    return heads_forward(members, member_sources, point, feats, tiles)


class STimageNet(nnx.Module):
    """uint8 tiles (B, H, W, 3) → (log_mu, log_r), each (B, G): backbone then NB head."""

    def __init__(self, backbone: nnx.Module, head: NBHead):
        self.backbone, self.head = backbone, head

    def __call__(self, tiles):
        return self.head(self.backbone(tiles))


def build_member(cfg: dict, *, rngs: nnx.Rngs, backbone: nnx.Module | None = None,
                 source: dict | None = None):
    """An untrained member with the architecture described by ``cfg`` (model.json).

    source: the member's feature source (default: the first)."""
    source = source if source is not None else cfg["sources"][0]
    head = NBHead(source["num_features"], len(cfg["genes"]), rngs=rngs, **cfg["head"])
    if cfg["fine_tune"]:
        bb = backbone if backbone is not None else create_backbone(source["backbone"], rngs=rngs)
        return STimageNet(bb, head)
    return head


def _upgrade(cfg: dict) -> dict:
    """A stimage-jax/1 config (one frozen or fine-tuned backbone) in the /2 form."""
    if cfg.get("format") == "stimage-jax/1":
        cfg = {**cfg, "format": MODEL_FORMAT,
               "sources": [{"name": cfg["backbone"], "kind": "backbone", "backbone": cfg["backbone"],
                            "num_features": cfg["num_features"], "weights": cfg.get("weights")}],
               "member_sources": [cfg["backbone"]] * cfg["members"], "_v1_layout": True}
    return cfg


def _check_config(cfg: dict, meta: Path) -> None:
    """The fields of model.json that loading and predicting rely on, with their types."""
    def bad(what):
        raise StimageError(f"{meta} is corrupt: {what}; retrain or restore the file")

    genes = cfg.get("genes")
    if not isinstance(genes, list) or not genes or not all(isinstance(g, str) and g for g in genes):
        bad("'genes' must be a non-empty list of gene names")
    if len(set(genes)) != len(genes):
        bad("'genes' lists a gene twice")
    sources = cfg.get("sources")
    if not isinstance(sources, list) or not sources or not all(
            isinstance(x, dict) and isinstance(x.get("name"), str) and x.get("kind") in ("backbone", "embeddings")
            and isinstance(x.get("num_features"), int) for x in sources):
        bad("'sources' must list feature sources (name, kind, num_features)")
    names = {x["name"] for x in sources}
    ms = cfg.get("member_sources")
    if not isinstance(ms, list) or not ms or not all(m in names for m in ms) or cfg.get("members") != len(ms):
        bad("'member_sources' must name a source per member ('members' of them)")
    head = cfg.get("head")
    if not isinstance(head, dict) or not isinstance(cfg.get("train"), dict) \
            or cfg["train"].get("loss") not in ("nb", "mse_log1p"):
        bad("'head' and 'train' (with its loss) are missing")
    hidden, dropout = head.get("hidden", 0), head.get("dropout", 0.0)
    if not (isinstance(hidden, int) and not isinstance(hidden, bool) and 0 <= hidden <= 1 << 16
            and isinstance(dropout, (int, float)) and 0 <= dropout < 1) or set(head) - {"hidden", "dropout"}:
        bad("'head' must hold hidden (a whole number >= 0) and dropout (0 to 1)")
    if not isinstance(cfg.get("backbone"), str) or not cfg["backbone"]:
        bad("'backbone' must name the feature source(s)")
    if not isinstance(cfg.get("fine_tune"), bool):
        bad("'fine_tune' must be true or false")
    tile_px, tile_um = cfg.get("tile_px"), cfg.get("tile_um")
    if any(x["kind"] == "backbone" for x in sources) and not (
            isinstance(tile_px, int) and 8 <= tile_px <= 8192 and isinstance(tile_um, (int, float)) and 0 < tile_um):
        bad("'tile_px' and 'tile_um' must be a tile size in px (8-8192) and µm")
    from export.runtime.context import TTA_VIEWS, check_smoothing

    if cfg.get("tta", 1) not in TTA_VIEWS or isinstance(cfg.get("tta"), bool):
        bad(f"'tta' must be one of {', '.join(map(str, TTA_VIEWS))}")
    check_smoothing(cfg.get("smoothing"), str(meta))


def _stack(states):
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *states)


def _host(tree):
    # Typed PRNG keys (dropout streams) are not needed at inference: store their raw data.
    def f(a):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return np.asarray(jax.random.key_data(a))
        return np.asarray(a)
    return jax.tree.map(f, tree)


def _abstract_host(module):
    """The restore target of ``module``'s state: shapes/dtypes as saved by :func:`_host`."""
    def f(a):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.eval_shape(jax.random.key_data, a)
        return jax.ShapeDtypeStruct(a.shape, a.dtype)
    return jax.tree.map(f, nnx.to_pure_dict(nnx.state(module)))


def _solo_checkpointer() -> ocp.StandardCheckpointer:
    """An Orbax checkpointer for this process alone: a model folder holds host arrays and is
    written by process 0 only (and read by each process for itself), so none of Orbax's
    cross-process barriers may wait for the others."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))


@dataclasses.dataclass
class EnsembleModel:
    """config (model.json), frozen backbones by source name, and the member modules.

    A :class:`~export.runtime.predictor.Predictor` (task ``regress``): ``params(tiles)``
    returns every member's NB ``mu`` and ``r``.
    """

    config: dict
    backbones: dict[str, nnx.Module]
    members: list
    embeddings_override: str | None = None  # read embedding sources from this key/folder instead
    task = REGRESS

    def spot_features(self, adata) -> dict:
        """Precomputed embeddings of ``adata``'s spots by source name (``obsm[key]`` or
        ``key/<sample>.npy``); {} for a tiles-only model."""
        from stimage_jax.features.embeddings import load_embeddings

        return {s["name"]: load_embeddings(adata, self.embeddings_override or s["key"])
                for s in self.embedding_sources()}

    @property
    def tile_um(self) -> float | None:
        return None if self.config["tile_um"] is None else float(self.config["tile_um"])

    @property
    def tile_px(self) -> int | None:
        return None if self.config["tile_px"] is None else int(self.config["tile_px"])

    @property
    def provenance(self) -> dict:
        return {**model_provenance(self.config), "runtime": "jax"}

    @property
    def tta(self) -> int:
        """Dihedral views whose frozen-backbone features are averaged (1 = off; models saved
        before issue 21 have no record and used none)."""
        return int(self.config.get("tta", 1))

    @property
    def smoothing(self) -> dict:
        """``{"alpha", "k"}``: each member's NB mean averaged with its k nearest spots' at
        prediction (alpha 0 = off; see export.runtime.context)."""
        from export.runtime.context import check_smoothing

        return check_smoothing(self.config.get("smoothing"), "model.json")

    @property
    def point(self) -> bool:
        """A log1p-MSE model: point predictions (r = inf), not NB distributions."""
        return self.config["train"]["loss"] == "mse_log1p"

    def needs_tiles(self, features: dict | None = None) -> bool:
        have = set(features or {})
        return self.config["fine_tune"] or any(s["name"] not in have for s in self.sources
                                               if s["kind"] == "backbone")

    def params(self, tiles, *, batch_size: int = 32, progress: bool = False, features=None) -> dict:
        """uint8 tiles (N, H, W, 3) and/or features by source → {"mu", "r"}, each (M, N, G)."""
        mu, r = self.member_params(tiles, batch_size=batch_size, progress=progress, features=features)
        return {"mu": mu, "r": r}

    @property
    def genes(self) -> list[str]:
        return list(self.config["genes"])

    @property
    def sources(self) -> list[dict]:
        return list(self.config["sources"])

    @property
    def member_sources(self) -> list[str]:
        return list(self.config["member_sources"])

    @property
    def stain(self):
        """The stain :class:`~data_pipelines.stain_normalisation.Reference` tiles are
        normalised towards, or None (raw tiles)."""
        d = self.config.get("stain")
        if not d:
            return None
        from data_pipelines.stain_normalisation import Reference

        return Reference.from_dict(d, where="the model's stain reference")

    @property
    def backbone(self) -> nnx.Module | None:
        """The frozen backbone when the model has exactly one source and it is one."""
        return next(iter(self.backbones.values())) if len(self.sources) == 1 and self.backbones else None

    def embedding_sources(self) -> list[dict]:
        return [s for s in self.sources if s["kind"] == "embeddings"]

    def save(self, model_dir: str | os.PathLike) -> Path:
        """Write atomically: a temporary sibling folder renamed onto ``model_dir``."""
        model_dir = Path(model_dir).absolute()
        with atomic_dir(model_dir) as tmp:
            ckptr = _solo_checkpointer()
            for name, bb in self.backbones.items():
                ckptr.save(tmp / f"backbone_{name}", _host(nnx.to_pure_dict(nnx.state(bb))))
            for src in self.sources:
                group = [m for m, s in zip(self.members, self.member_sources) if s == src["name"]]
                ckptr.save(tmp / f"members_{src['name']}",
                           _stack([_host(nnx.to_pure_dict(nnx.state(m))) for m in group]))
            ckptr.wait_until_finished()
            write_digests(tmp)
            (tmp / "model.json").write_text(json.dumps(self.config, indent=1))
        return model_dir

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> "EnsembleModel":
        model_dir = resolve_model_dir(model_dir)
        meta = model_dir / "model.json"
        if not meta.is_file():
            raise StimageError(f"{model_dir} is not a trained model (no model.json); "
                               "train one with `stimage train --workdir ...`")
        cfg = _upgrade(read_model_json(meta))
        if cfg.get("format") != MODEL_FORMAT:
            raise StimageError(f"{meta} has format {cfg.get('format')!r}, expected {MODEL_FORMAT!r}")
        _check_config(cfg, meta)
        v1 = cfg.pop("_v1_layout", False)
        verify_digests(model_dir)
        ckptr = _solo_checkpointer()

        def restore(path, target):
            try:
                got = ckptr.restore(path.absolute(), target)
            except Exception as e:
                raise StimageError(f"model checkpoint {path} is missing or corrupt "
                                   f"({type(e).__name__}); retrain or restore the folder") from None
            # Orbax hands back the stored shapes even when they differ from the target's:
            # model.json (genes, features, members) and the arrays must agree.
            if jax.tree.structure(got) != jax.tree.structure(target) or any(
                    np.shape(a) != tuple(t.shape) for a, t in zip(jax.tree.leaves(got), jax.tree.leaves(target))):
                raise StimageError(f"model checkpoint {path} does not match {meta.name} (its genes, features or "
                                   "members differ); retrain or restore the folder")
            return got

        # Modules are built abstractly (nnx.eval_shape) and filled from the checkpoint:
        # random initialisation cost ~11 s of XLA compilation per load on 2 CPU cores
        # (EfficientNet-Lite0), only to be overwritten.
        backbones = {}
        members: list = [None] * len(cfg["member_sources"])
        for src in cfg["sources"]:
            name = src["name"]
            if src["kind"] == "backbone" and not cfg["fine_tune"]:
                bb = nnx.eval_shape(lambda: create_backbone(src["backbone"], rngs=nnx.Rngs(0)))
                _load_into(bb, restore(model_dir / ("backbone" if v1 else f"backbone_{name}"), _abstract_host(bb)))
                bb.eval()
                backbones[name] = bb
            idx = [i for i, s in enumerate(cfg["member_sources"]) if s == name]
            make = lambda: build_member(cfg, rngs=nnx.Rngs(0), source=src)  # noqa: E731
            one = _abstract_host(nnx.eval_shape(make))
            stacked = restore(model_dir / ("members" if v1 else f"members_{name}"),
                              jax.tree.map(lambda a: jax.ShapeDtypeStruct((len(idx), *a.shape), a.dtype), one))
            for j, i in enumerate(idx):
                mod = nnx.eval_shape(make)
                _load_into(mod, jax.tree.map(lambda a: a[j], stacked))
                mod.eval()
                members[i] = mod
        return cls(cfg, backbones, members)

    def source_features(self, tiles: np.ndarray | None, *, features=None, batch_size: int = 32,
                        progress: bool = True) -> dict[str, np.ndarray]:
        """(N, D_s) features per source name: frozen backbones run once on ``tiles``.

        features: precomputed arrays by source name (required for embedding sources; an
        array instead of a dict stands for the only source).
        """
        from stimage_jax.features.extract import extract_features
        from stimage_jax.features.tta import tta_extract

        if features is not None and not isinstance(features, dict):
            if len(self.sources) != 1:
                raise StimageError("this model has several feature sources: pass features by source name")
            features = {self.sources[0]["name"]: features}
        features = dict(features or {})
        for src in self.sources:
            name = src["name"]
            if name in features:
                f = np.asarray(features[name])
                if f.ndim != 2 or f.shape[1] != src["num_features"]:
                    raise StimageError(f"features for {name} have shape {f.shape}; the model expects "
                                       f"(spots, {src['num_features']})")
            elif src["kind"] == "embeddings":
                raise StimageError(f"this model needs precomputed embeddings {src['key']!r} "
                                   "(obsm key or folder of <sample>.npy)")
            elif name in self.backbones:
                if tiles is None:
                    raise StimageError(f"source {name} needs tiles or precomputed features")
                features[name] = (extract_features(self.backbones[name], tiles, batch_size=batch_size,
                                                   progress=progress) if self.tta == 1 else
                                  tta_extract(self.backbones[name], tiles, self.tta, batch_size=batch_size,
                                              progress=progress))
        return features

    def member_params(self, tiles: np.ndarray | None, *, batch_size: int = 32, progress: bool = True,
                      features=None):
        """uint8 tiles (N, H, W, 3) → NB (mu, r), each (M, N, G) float32 numpy.

        Frozen backbones run once over the tiles in batches (:meth:`source_features`), then
        :func:`heads_forward` runs every member on the features; fine-tuned members run it
        on tile batches. ``features``: see :meth:`source_features`.
        """
        sources = tuple(self.member_sources)
        if not self.config["fine_tune"]:
            feats = self.source_features(tiles, features=features, batch_size=batch_size, progress=progress)
            mu, r = _heads_jit(self.members, sources, self.point,
                               {k: jnp.asarray(v) for k, v in feats.items()}, None)
            return np.asarray(mu), np.asarray(r)
        if tiles is None:
            raise StimageError("a fine-tuned model needs tiles")
        # One member per call: the program is compiled once and reused by every member
        # (all M networks in one program would compile M times as long).
        mus, rs = [], []
        for mem, src in zip(self.members, sources):
            outs = [_heads_jit([mem], (src,), self.point, {}, jnp.asarray(np.asarray(tiles[s:s + batch_size])))
                    for s in range(0, len(tiles), batch_size)]
            mus.append(np.concatenate([np.asarray(o[0]) for o in outs], axis=1))
            rs.append(np.concatenate([np.asarray(o[1]) for o in outs], axis=1))
        return np.concatenate(mus), np.concatenate(rs)


def _load_into(module, pure: dict) -> None:
    state = nnx.state(module)
    # Restore typed keys from their raw data where the template holds a typed key.
    def fix(t, v):
        if hasattr(t, "dtype") and jax.dtypes.issubdtype(t.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(jnp.asarray(v))
        return jnp.asarray(v)
    pure = jax.tree.map(fix, nnx.to_pure_dict(state), pure)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(module, state)
