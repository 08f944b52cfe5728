"""``stimage predict --model M (--data X.h5ad | --slide S) --out P.h5ad``: any model
(workdir, ``model/`` folder or exported ``.onnx``) through the one prediction path
(:func:`export.predict.run`, which ``python -m export.predict`` also uses). ``--out P.zarr``
writes SpatialData; ``--data`` reads ``.h5ad`` or ``.zarr``."""

from __future__ import annotations

from data_pipelines.errors import StimageError
from export.predict import add_image_root
from export.runtime.options import add_prediction_options


def add_parser(sub, parents) -> None:
    pr = sub.add_parser("predict", parents=list(parents), help="predict expression for spots or a whole slide")
    pr.add_argument("--model", required=True, help="training workdir (or its model/ folder), or an exported .onnx")
    add_prediction_options(pr)
    add_image_root(pr)
    pr.add_argument("--embeddings", help="embedding models: obsm key or folder (default: as trained)")
    pr.set_defaults(func=run)


def run(a) -> None:
    from export.predict import run as predict_run
    from stimage_jax.models import load_model

    model = load_model(a.model)
    if a.embeddings:
        if not hasattr(model, "embeddings_override"):
            raise StimageError("--embeddings applies to models trained on precomputed embeddings")
        model.embeddings_override = a.embeddings
    print(predict_run(model, a))
