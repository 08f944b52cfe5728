"""A trained ensemble on disk and in memory.

``WORKDIR/model/`` holds ``model.json`` (genes, backbone, tile geometry, training
provenance), ``backbone/`` (the frozen backbone's state, so a model never depends on
where its pretrained weights file lived) and ``members/`` (member states stacked on a
leading axis: heads on a frozen backbone, or whole networks when fine-tuned).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from data_pipelines.errors import StimageError
from stimage_jax.features.registry import create_backbone
from stimage_jax.nb.distribution import params_from_logits
from stimage_jax.nb.head import NBHead

__all__ = ["STimageNet", "EnsembleModel", "MODEL_FORMAT", "build_member"]

MODEL_FORMAT = "stimage-jax/1"


class STimageNet(nnx.Module):
    """uint8 tiles (B, H, W, 3) → (log_mu, log_r), each (B, G): backbone then NB head."""

    def __init__(self, backbone: nnx.Module, head: NBHead):
        self.backbone, self.head = backbone, head

    def __call__(self, tiles):
        return self.head(self.backbone(tiles))


def build_member(cfg: dict, *, rngs: nnx.Rngs, backbone: nnx.Module | None = None):
    """An untrained member with the architecture described by ``cfg`` (model.json)."""
    head = NBHead(cfg["num_features"], len(cfg["genes"]), rngs=rngs, **cfg["head"])
    if cfg["fine_tune"]:
        bb = backbone if backbone is not None else create_backbone(cfg["backbone"], rngs=rngs)
        return STimageNet(bb, head)
    return head


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


@dataclasses.dataclass
class EnsembleModel:
    """config (model.json), an optional shared frozen backbone, and the member modules."""

    config: dict
    backbone: nnx.Module | None
    members: list

    @property
    def genes(self) -> list[str]:
        return list(self.config["genes"])

    def save(self, model_dir: str | os.PathLike) -> Path:
        """Write atomically: a temporary sibling folder renamed onto ``model_dir``."""
        model_dir = Path(model_dir).absolute()
        tmp = model_dir.with_name(model_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ckptr = ocp.StandardCheckpointer()
        if self.backbone is not None:
            ckptr.save(tmp / "backbone", _host(nnx.to_pure_dict(nnx.state(self.backbone))))
        ckptr.save(tmp / "members", _stack([_host(nnx.to_pure_dict(nnx.state(m))) for m in self.members]))
        ckptr.wait_until_finished()
        (tmp / "model.json").write_text(json.dumps(self.config, indent=1))
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(tmp, model_dir)
        return model_dir

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> "EnsembleModel":
        model_dir = Path(model_dir)
        if (model_dir / "model" / "model.json").is_file():  # a workdir was given
            model_dir = model_dir / "model"
        meta = model_dir / "model.json"
        if not meta.is_file():
            raise StimageError(f"{model_dir} is not a trained model (no model.json); "
                               "train one with `stimage train --workdir ...`")
        try:
            cfg = json.loads(meta.read_text())
        except json.JSONDecodeError as e:
            raise StimageError(f"{meta} is corrupt: {e}") from None
        if cfg.get("format") != MODEL_FORMAT:
            raise StimageError(f"{meta} has format {cfg.get('format')!r}, expected {MODEL_FORMAT!r}")
        ckptr = ocp.StandardCheckpointer()

        def restore(path, target):
            try:
                return ckptr.restore(path.absolute(), target)
            except Exception as e:
                raise StimageError(f"model checkpoint {path} is missing or corrupt "
                                   f"({type(e).__name__}); retrain or restore the folder") from None

        # Modules are built abstractly (nnx.eval_shape) and filled from the checkpoint:
        # random initialisation cost ~11 s of XLA compilation per load on 2 CPU cores
        # (EfficientNet-Lite0), only to be overwritten.
        def abstract(make):
            return nnx.eval_shape(make)

        backbone = None
        if not cfg["fine_tune"]:
            backbone = abstract(lambda: create_backbone(cfg["backbone"], rngs=nnx.Rngs(0)))
            _load_into(backbone, restore(model_dir / "backbone", _abstract_host(backbone)))
            backbone.eval()
        m = cfg["members"]
        one = _abstract_host(abstract(lambda: build_member(cfg, rngs=nnx.Rngs(0))))
        stacked = restore(model_dir / "members",
                          jax.tree.map(lambda a: jax.ShapeDtypeStruct((m, *a.shape), a.dtype), one))
        members = []
        for i in range(m):
            mod = abstract(lambda: build_member(cfg, rngs=nnx.Rngs(0)))
            _load_into(mod, jax.tree.map(lambda a: a[i], stacked))
            mod.eval()
            members.append(mod)
        return cls(cfg, backbone, members)

    def member_params(self, tiles: np.ndarray, *, batch_size: int = 32, progress: bool = True,
                      features: np.ndarray | None = None):
        """uint8 tiles (N, H, W, 3) → NB (mu, r), each (M, N, G) float32 numpy.

        On CPU members are stepped in a loop (grouped convolutions make ``vmap`` slower
        there); a frozen backbone runs once and all heads reuse its features.
        """
        from stimage_jax.features.extract import extract_features

        to_params = _point_params if self.config["train"]["loss"] == "mse_log1p" else params_from_logits
        mus, rs = [], []
        if self.backbone is not None:
            feats = features if features is not None else extract_features(
                self.backbone, tiles, batch_size=batch_size, progress=progress)
            x = jnp.asarray(feats)
            for mem in self.members:
                mu, r = to_params(*_apply(mem, x))
                mus.append(np.asarray(mu)); rs.append(np.asarray(r))
        else:
            for mem in self.members:
                outs = [to_params(*_apply(mem, jnp.asarray(np.asarray(tiles[s:s + batch_size]))))
                        for s in range(0, len(tiles), batch_size)]
                mus.append(np.concatenate([np.asarray(o[0]) for o in outs]))
                rs.append(np.concatenate([np.asarray(o[1]) for o in outs]))
        return np.stack(mus), np.stack(rs)


def _point_params(log1p_pred, _unused):
    """A log1p-MSE model predicts a point, not a distribution: mean expm1(out), r = inf."""
    return jnp.expm1(jnp.maximum(log1p_pred, 0.0)), jnp.full_like(log1p_pred, jnp.inf)


@nnx.jit
def _apply(module, x):
    return module(x)


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
