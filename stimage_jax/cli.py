"""``stimage`` command line: parses arguments and calls the library, nothing more.

Bad input raises :class:`StimageError`; it is printed as one ``stimage: error:`` line
and the exit status is 2. Outputs are written atomically and never overwrite an existing
file without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from data_pipelines.errors import StimageError
from data_pipelines.paths import shared_dir
from data_pipelines.stain_normalisation import METHODS as STAIN_METHODS

__all__ = ["main", "build_parser"]


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def cmd_read(a) -> None:
    from data_pipelines.io import check_writable, write_h5ad
    from data_pipelines.slides import read_her2st, read_visium

    if a.format == "her2st":
        out = Path(a.out)
        sections = _csv(a.sections)
        targets = [out / f"{s}.h5ad" for s in sections]
        for t in targets:  # refuse before reading anything
            check_writable(t, a.overwrite)
        for s, t in zip(sections, targets):
            adata = read_her2st(a.path, s, require_image=not a.allow_missing_image)
            write_h5ad(adata, t, overwrite=a.overwrite)
            print(f"{s}: {adata.n_obs} spots x {adata.n_vars} genes -> {t}")
    else:
        check_writable(a.out, a.overwrite)
        adata = read_visium(a.path, image=a.image)
        write_h5ad(adata, a.out, overwrite=a.overwrite)
        print(f"{adata.n_obs} spots x {adata.n_vars} genes -> {a.out}")


def _train_config(a):
    from stimage_jax.ensemble.train import TrainConfig

    return TrainConfig(lr=a.lr, batch_size=a.batch_size, max_epochs=a.max_epochs,
                       patience=a.patience, loss={"counts": "nb", "log1p": "mse_log1p"}[a.target])


def cmd_train(a) -> None:
    from stimage_jax.pipeline import train, train_classifier

    if a.task == "classify":
        if a.members != 1 or a.fine_tune or a.embeddings:
            raise StimageError("--task classify fits one logistic model per gene on frozen backbone features "
                               "(no --members, --fine-tune or --embeddings)")
        model = train_classifier(a.data, a.workdir, genes=a.genes, backbone=a.backbone or "efficientnet_lite0",
                                 weights=a.weights, tile_um=a.tile_um, tile_px=a.tile_px, C=a.C,
                                 l1_ratio=a.l1_ratio, seed=a.seed, stain=a.stain, stain_template=a.stain_template,
                                 min_coverage=a.min_coverage, progress=not a.quiet, overwrite=a.overwrite)
        print(f"trained high/low classifiers for {len(model.genes)} genes on "
              f"{', '.join(model.config['training_samples'])} (features {model.config['backbone']}) "
              f"-> {Path(a.workdir) / 'model'}")
        return

    model = train(a.data, a.workdir, genes=a.genes, backbone=a.backbone, weights=a.weights,
                  embeddings=a.embeddings, members=a.members, fine_tune=a.fine_tune,
                  strategy=a.ensemble_strategy, tile_um=a.tile_um, tile_px=a.tile_px,
                  val_samples=_csv(a.val_samples) if a.val_samples else None,
                  config=_train_config(a), dropout=a.dropout, seed=a.seed, progress=not a.quiet,
                  overwrite=a.overwrite, stain=a.stain, stain_template=a.stain_template,
                  min_coverage=a.min_coverage, augment=a.augment, augment_views=a.augment_views)
    print(f"trained {model.config['members']} member(s) on {', '.join(model.config['training_samples'])} "
          f"({len(model.genes)} genes, features {model.config['backbone']}, {model.config['strategy']} strategy) "
          f"-> {Path(a.workdir) / 'model'}")


def cmd_predict(a) -> int | None:
    from data_pipelines.io import check_writable, write_h5ad
    from data_pipelines.slides import read_h5ad
    from stimage_jax.classify import ClassifierModel
    from stimage_jax.pipeline import load_model, predict, predict_classifier

    if str(a.model).endswith(".onnx"):  # the JAX-free runtime does the work
        from export.predict import main as onnx_main

        argv = ["--model", a.model, "--out", a.out, "--batch-size", str(a.batch_size),
                "--min-coverage", str(a.min_coverage)]
        argv += ["--slide", a.slide] if a.slide else ["--data", a.data]
        argv += (["--mpp", str(a.mpp)] if a.mpp else []) + (["--genes", a.genes] if a.genes else [])
        return onnx_main(argv + ["--overwrite"] * a.overwrite + ["--quiet"] * a.quiet)
    check_writable(a.out, a.overwrite)
    model = load_model(a.model)
    if isinstance(model, ClassifierModel):
        if a.slide:
            raise StimageError("classification models predict spots (--data), not slides, for now")
        pred = predict_classifier(read_h5ad(a.data), model, batch_size=a.batch_size, progress=not a.quiet)
        write_h5ad(pred, a.out, overwrite=a.overwrite)
        print(f"predicted P(high) of {pred.n_vars} genes for {pred.n_obs} spots -> {a.out}")
        return None
    if a.slide:
        from export.prediction import slide_to_files
        from stimage_jax.pipeline import provenance

        cfg = model.config
        # batch_size, not len(t): extract_features pads a short last batch, so one compile
        pred, maps = slide_to_files(a.slide, lambda t: model.member_params(t, batch_size=a.batch_size,
                                                                             progress=False),
                                    model.genes, {**provenance(cfg), "runtime": "jax"}, a.out,
                                    tile_um=cfg["tile_um"], tile_px=cfg["tile_px"], mpp=a.mpp,
                                    heatmap_genes=_csv(a.genes) if a.genes else [], min_coverage=a.min_coverage,
                                    batch_size=a.batch_size, overwrite=a.overwrite, progress=not a.quiet,
                                    stain=model.stain)
        for p in maps:
            print(f"heatmap -> {p}")
    else:
        pred = predict(read_h5ad(a.data), model, batch_size=a.batch_size, progress=not a.quiet,
                       embeddings=a.embeddings)
        write_h5ad(pred, a.out, overwrite=a.overwrite)
    print(f"predicted {pred.n_vars} genes for {pred.n_obs} {'tiles' if a.slide else 'spots'} -> {a.out}")


def cmd_export_onnx(a) -> None:
    from data_pipelines.io import check_writable
    from export.to_onnx import export_onnx
    from stimage_jax.ensemble.model import EnsembleModel

    check_writable(a.out, a.overwrite)
    model = EnsembleModel.load(a.model)
    out = export_onnx(model, a.out, overwrite=a.overwrite)
    size_mb = out.stat().st_size / 1e6
    print(f"exported {model.config['members']} member(s), {len(model.genes)} genes, "
          f"{model.config['tile_px']}px uint8 tiles -> {out} ({size_mb:.1f} MB)")


def _evaluate(pred_path, truth_path, out, overwrite, plot=None, plot_genes=None, *,
              uncertainty_genes=None, calibration=None):
    import re

    from data_pipelines.io import atomic_path, check_writable
    from data_pipelines.slides import read_h5ad
    from stimage_jax.metrics import calibration_table, evaluate, prediction_level, summarise

    # --plot-uncertainty GENE writes <out stem>_uncertainty_<GENE>.png beside --out
    unc_paths = {g: Path(out).with_name(f"{Path(out).stem}_uncertainty_{re.sub(r'[^0-9A-Za-z._-]', '_', g)}.png")
                 for g in uncertainty_genes or ()}
    for p in (out, *unc_paths.values(), *([calibration] if calibration else [])):
        check_writable(p, overwrite)
    if not Path(pred_path).is_file():
        raise StimageError(f"prediction file {pred_path} not found")
    import anndata as ad

    pred, truth = ad.read_h5ad(pred_path), read_h5ad(truth_path)
    unknown = [g for g in unc_paths if g not in set(pred.var_names)]
    if unknown:
        raise StimageError(f"--plot-uncertainty: gene(s) not in the prediction: {', '.join(unknown)}")
    cal = calibration_table(pred, truth) if calibration else None  # fails before anything is written
    table, missing = evaluate(pred, truth)
    with atomic_path(out, overwrite=overwrite) as tmp:
        table.to_csv(tmp, index=False)
    s = summarise(table)
    if missing:
        print(f"{len(missing)} predicted gene(s) absent from the truth, not scored: {', '.join(missing)}")
    print(f"{s['rows']} sample x gene rows: mean PCC {s['mean_pcc']:.3f}, median PCC {s['median_pcc']:.3f}, "
          f"mean Spearman {s['mean_spearman']:.3f}, PCC > 0 for {s['n_pcc_positive']}, NaN {s['n_nan']}"
          + (f", interval coverage {s['coverage']:.3f}" if "coverage" in s else "")
          + (f", NB-mixture NLL {s['nll']:.3f}" if "nll" in s else "")
          + (f", CRPS {s['crps']:.3f}" if "crps" in s else "")
          + (f", PIT coverage {s['pit_coverage']:.3f} (nominal {prediction_level(pred):g})"
             if "pit_coverage" in s else "") + f" -> {out}")
    if plot:
        from stimage_jax.plots import plot_spatial_genes

        genes = plot_genes or list(table.sort_values("pcc", ascending=False)["gene"].drop_duplicates()[:2])
        plot_spatial_genes(pred, truth, genes, plot, overwrite=overwrite)
        print(f"spatial maps of {', '.join(genes)} -> {plot}")
    for g, p in unc_paths.items():
        from stimage_jax.plots import plot_uncertainty_maps

        plot_uncertainty_maps(pred, g, p, truth=truth if g in set(truth.var_names) else None, overwrite=overwrite)
        print(f"mean, aleatoric and epistemic SD maps of {g} -> {p}")
    if cal is not None:
        from stimage_jax.plots import plot_calibration

        plot_calibration(cal, calibration, overwrite=overwrite)
        print(f"coverage calibration over {len(cal)} nominal levels -> {calibration}")
    return table


def cmd_evaluate(a) -> None:
    _evaluate(a.pred, a.truth, a.out, a.overwrite, a.plot, _csv(a.plot_genes) if a.plot_genes else None,
              uncertainty_genes=_csv(a.plot_uncertainty) if a.plot_uncertainty else None,
              calibration=a.plot_calibration)


def cmd_benchmark(a) -> None:
    from stimage_jax.ensemble.train import TrainConfig
    from stimage_jax.loso import run_loso
    from stimage_jax.metrics import summarise

    if a.protocol != "loso":
        raise StimageError(f"unknown protocol {a.protocol!r}; only 'loso' (leave one sample out) exists")
    data = a.data[0] if len(a.data) == 1 and Path(a.data[0]).is_dir() else a.data
    table = run_loso(data, a.workdir, methods=_csv(a.methods), genes=a.genes, backbone=a.backbone,
                     members=a.members, config=TrainConfig(lr=a.lr, max_epochs=a.max_epochs, patience=a.patience),
                     tile_um=a.tile_um, tile_px=a.tile_px, seed=a.seed, min_coverage=a.min_coverage,
                     samples=_csv(a.samples) if a.samples else None, progress=not a.quiet)
    for m, t in table.groupby("method", sort=False):
        s = summarise(t)
        print(f"{m}: mean PCC {s['mean_pcc']:.3f} over {t['fold'].nunique()} held-out sample(s), "
              f"{s['n_pcc_positive']}/{s['rows']} gene rows with PCC > 0")
    wd = Path(a.workdir)
    print(f"-> {wd / 'metrics.csv'}, {wd / 'summary.md'}, {wd / 'boxplot.png'}")


def cmd_explain(a) -> None:
    from data_pipelines.slides import read_h5ad
    from stimage_jax.explain.spot import explain_saliency, read_tile, spot_tile
    from stimage_jax.pipeline import load_model

    if bool(a.data) == bool(a.tile):
        raise StimageError("give --data with --spot, or --tile")
    if a.data and not a.spot:
        raise StimageError("--data needs --spot ID (an obs name)")
    if str(a.model).endswith(".onnx"):
        if a.method != "lime":
            raise StimageError("saliency needs gradients: give the training workdir, not the .onnx file")
        from export.predict import OnnxEnsemble

        model = OnnxEnsemble(a.model)  # LIME is forward passes only: onnxruntime is faster on CPU
    else:
        model = load_model(a.model)
    if a.gene not in model.genes:
        raise StimageError(f"gene {a.gene!r} is not predicted by this model ({', '.join(model.genes[:5])}, ...)")
    if a.tile:
        from stimage_jax.explain.spot import tile_geometry_of

        tile, name = read_tile(a.tile, tile_geometry_of(model)[1]), Path(a.tile).stem
    else:
        tile, name = spot_tile(read_h5ad(a.data), model, a.spot), a.spot
    if a.method == "saliency":
        res = explain_saliency(model, tile, a.gene, a.out, name=name, seed=a.seed, n_samples=a.samples or 25)
        print(f"SmoothGrad of {a.gene} (predicted mean {res['mean']:.2f}) -> {res['png']}, {res['npy']}")
    else:
        from stimage_jax.explain.lime_nuclei import explain_lime

        res = explain_lime(model, tile, a.gene, a.out, name=name, seed=a.seed, num_samples=a.samples or 1000)
        print(f"LIME over {res['n_nuclei']} nuclei for {a.gene} (predicted {res['value']:.3f}): "
              f"{res['note']}-> {res['png']}, {res['csv']}")


def cmd_latent(a) -> None:
    from data_pipelines.io import check_writable
    from data_pipelines.slides import read_h5ad
    from stimage_jax.explain.spot import latent_figure
    from stimage_jax.pipeline import load_model

    check_writable(a.out, a.overwrite)
    model = load_model(a.model)
    path = latent_figure(read_h5ad(a.data), model, _csv(a.genes), a.out, progress=not a.quiet)
    print(f"latent space (PCA of features) -> {path}")


def cmd_quickstart(a) -> None:
    """The README's main job: HER2ST C2–C6, train on four sections, predict the fifth."""
    from data_pipelines.io import write_h5ad
    from data_pipelines.slides import read_her2st
    from stimage_jax.ensemble.train import TrainConfig
    from stimage_jax.pipeline import train

    root = Path(a.shared) / "data" / "her2st"
    wd = Path(a.workdir)
    sections = _csv(a.sections)
    if a.test_section not in sections:
        raise StimageError(f"--test-section {a.test_section} is not among --sections {a.sections}")
    paths = {}
    for s in sections:
        p = wd / "data" / f"{s}.h5ad"
        if not p.exists():
            write_h5ad(read_her2st(root, s, require_image=True), p)
        paths[s] = p
    train_secs = [s for s in sections if s != a.test_section]
    print(f"[1/3] training on {', '.join(train_secs)} (validation {train_secs[-1]}), genes: {a.genes}")
    model = train([paths[s] for s in train_secs], wd / "model_run", genes=a.genes, backbone=a.backbone,
                  members=a.members, config=TrainConfig(lr=a.lr, max_epochs=a.max_epochs),
                  progress=not a.quiet)
    print(f"[2/3] predicting {a.test_section}")
    from stimage_jax.pipeline import predict
    from data_pipelines.slides import read_h5ad

    pred = predict(read_h5ad(paths[a.test_section]), model, progress=not a.quiet)
    write_h5ad(pred, wd / f"{a.test_section}_pred.h5ad", overwrite=True)
    print(f"[3/3] evaluating {a.test_section}")
    _evaluate(wd / f"{a.test_section}_pred.h5ad", paths[a.test_section], wd / "metrics.csv", True,
              plot=wd / "spatial_maps.png")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stimage", description=__doc__.splitlines()[0])
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    # --quiet is accepted before or after the subcommand; SUPPRESS keeps the sub-level
    # default from overriding a top-level --quiet.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("read", parents=[common], help="read spatial transcriptomics into .h5ad")
    r.add_argument("format", choices=["her2st", "visium"])
    r.add_argument("path", help="HER2ST root folder, or a Space Ranger output folder")
    r.add_argument("--sections", default="C2,C3,C4,C5,C6", help="HER2ST sections (comma separated)")
    r.add_argument("--out", required=True, help="folder (her2st) or .h5ad file (visium)")
    r.add_argument("--image", help="Visium full-resolution image (default: the hires PNG)")
    r.add_argument("--allow-missing-image", action="store_true",
                   help="HER2ST: read counts of sections without an H&E image")
    r.add_argument("--overwrite", action="store_true")
    r.set_defaults(func=cmd_read)

    t = sub.add_parser("train", parents=[common], help="train an NB regression ensemble")
    t.add_argument("--data", nargs="+", required=True, help=".h5ad files (one or more samples each)")
    t.add_argument("--genes", default="markers", help="markers | top-hvg:N | file:PATH | G1,G2,...")
    t.add_argument("--backbone", help="feature extractor(s), comma separated for an FSTimage ensemble "
                   "(default efficientnet_lite0, or none with --embeddings)")
    t.add_argument("--weights", help="pretrained weights (safetensors; .pth with torch installed); "
                   "one per backbone, comma separated; 'default' keeps a backbone's shipped weights, "
                   "'none' initialises at random")
    t.add_argument("--embeddings", help="precomputed spot embeddings (UNI, Virchow2, ...): an obsm key, "
                   "or a folder of <sample>.npy; trained as one more feature source")
    t.add_argument("--members", type=int, default=1, help="members per feature source")
    t.add_argument("--task", default="regress", choices=["regress", "classify"],
                   help="regress: NB counts (default); classify: high/low per gene (elastic-net logistic)")
    t.add_argument("--C", type=float, default=0.1, help="--task classify: inverse regularisation strength")
    t.add_argument("--l1-ratio", type=float, default=0.5, help="--task classify: elastic-net mixing")
    t.add_argument("--stain", default="none", choices=["none", *STAIN_METHODS],
                   help="stain-normalise every tile towards a template (stored with the model, reused "
                   "at prediction); default none")
    t.add_argument("--augment", default="none", choices=["none", "default", "hed"],
                   help="training-tile augmentation: default = flips, rot90, affine, blur/noise/HSV/grey; "
                   "hed = default + H&E stain jitter")
    t.add_argument("--augment-views", type=int, default=4,
                   help="frozen backbone: augmented copies of each training tile (features cached)")
    t.add_argument("--min-coverage", type=float, default=0.7,
                   help="leave out spots whose tile is less than this fraction tissue (0 keeps all)")
    t.add_argument("--stain-template", help="template H&E image for --stain (default: a low-resolution view "
                   "of the first training sample's image)")
    t.add_argument("--ensemble-strategy", default="auto", choices=["auto", "vmap", "loop"],
                   help="train members at once (vmap) or one by one (loop); auto: loop when "
                        "fine-tuning on CPU, else vmap")
    t.add_argument("--fine-tune", action="store_true", help="train the backbone too (slow on CPU)")
    t.add_argument("--val-samples", help="samples used for early stopping (default: the last one)")
    t.add_argument("--tile-um", type=float, help="tile side in µm (default: spot diameter)")
    t.add_argument("--tile-px", type=int, default=299)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--max-epochs", type=int, default=200)
    t.add_argument("--patience", type=int, default=10)
    t.add_argument("--target", default="counts", choices=["counts", "log1p"],
                   help="counts: NB likelihood of raw counts (STimage); log1p: MSE on log1p counts, "
                        "a point-prediction baseline for comparison")
    t.add_argument("--dropout", type=float, default=0.0, help="dropout on the head's input features")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workdir", required=True)
    t.add_argument("--overwrite", action="store_true", help="replace a different run in --workdir")
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("predict", parents=[common], help="predict expression for the spots of an .h5ad")
    pr.add_argument("--model", required=True, help="training workdir (or its model/ folder), or an exported .onnx")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help=".h5ad of spots (with image)")
    src.add_argument("--slide", help="H&E-only slide: pyramidal TIFF/SVS, or JPEG/PNG with --mpp")
    pr.add_argument("--mpp", type=float, help="slide µm per pixel when its metadata lacks it")
    pr.add_argument("--min-coverage", type=float, default=0.7, help="slide tiles need this tissue fraction")
    pr.add_argument("--genes", help="slide: a heatmap PNG per gene, OUT_<gene>.png")
    pr.add_argument("--embeddings", help="embedding models: obsm key or folder (default: as trained)")
    pr.add_argument("--out", required=True)
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--overwrite", action="store_true")
    pr.set_defaults(func=cmd_predict)

    x = sub.add_parser("export-onnx", parents=[common], help="export a trained model to ONNX")
    x.add_argument("--model", required=True, help="training workdir (or its model/ folder)")
    x.add_argument("--out", required=True, help="the .onnx file to write")
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(func=cmd_export_onnx)

    e = sub.add_parser("evaluate", parents=[common], help="score predictions against observed counts")
    e.add_argument("--pred", required=True)
    e.add_argument("--truth", required=True)
    e.add_argument("--out", required=True, help="metrics CSV, one row per sample and gene")
    e.add_argument("--plot", help="PNG of observed vs predicted maps")
    e.add_argument("--plot-genes", help="genes to plot (default: the two best by PCC)")
    e.add_argument("--plot-uncertainty", metavar="GENE[,GENE]",
                   help="PNG per gene of observed, predicted mean, aleatoric and epistemic SD maps, "
                        "written next to --out as <out stem>_uncertainty_<GENE>.png")
    e.add_argument("--plot-calibration", metavar="PATH.png",
                   help="PNG of observed vs nominal coverage (quantile interval and PIT) over levels "
                        "0.1-0.95; needs the members' NB parameters (stimage predict --data keeps them)")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    ex = sub.add_parser("explain", parents=[common], help="why a spot gets its prediction (saliency, LIME)")
    ex.add_argument("--model", required=True)
    ex.add_argument("--data", help=".h5ad holding the spot")
    ex.add_argument("--spot", help="obs name of the spot to explain")
    ex.add_argument("--tile", help="or a tile image of the model's size")
    ex.add_argument("--gene", required=True)
    ex.add_argument("--method", default="lime", choices=["lime", "saliency"])
    ex.add_argument("--samples", type=int, default=None,
                    help="perturbations (LIME, default 1000) or noisy copies (SmoothGrad, default 25)")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--out", required=True, help="output folder")
    ex.set_defaults(func=cmd_explain)

    la = sub.add_parser("latent", parents=[common], help="PCA of backbone features coloured by expression (PNG)")
    la.add_argument("--model", required=True)
    la.add_argument("--data", required=True)
    la.add_argument("--genes", required=True)
    la.add_argument("--out", required=True, help="PNG")
    la.add_argument("--overwrite", action="store_true")
    la.set_defaults(func=cmd_latent)

    b = sub.add_parser("benchmark", parents=[common],
                       help="leave-one-sample-out: STimage (ensemble, single), ridge and MSE on the same folds")
    b.add_argument("--data", nargs="+", required=True, help=".h5ad files, or one folder of them")
    b.add_argument("--protocol", default="loso")
    b.add_argument("--methods", default="stimage,stimage_single,ridge,mse")
    b.add_argument("--samples", help="hold out only these samples (default: each in turn)")
    b.add_argument("--workdir", required=True)
    b.add_argument("--genes", default="top-hvg:50", help="chosen per fold on its training samples")
    b.add_argument("--backbone", default="efficientnet_lite0")
    b.add_argument("--members", type=int, default=5)
    b.add_argument("--tile-um", type=float)
    b.add_argument("--tile-px", type=int, default=299)
    b.add_argument("--lr", type=float, default=1e-4)
    b.add_argument("--max-epochs", type=int, default=200)
    b.add_argument("--patience", type=int, default=10)
    b.add_argument("--min-coverage", type=float, default=0.7)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_benchmark)

    from stimage_jax.cells.cli import add_cells_parser

    add_cells_parser(sub, parents=(common,))

    q = sub.add_parser("quickstart", parents=[common], help="the main job on the shipped HER2ST data")
    q.add_argument("--shared", default=str(shared_dir()), help="the shared/ data folder")
    q.add_argument("--workdir", default="runs/quickstart")
    q.add_argument("--sections", default="C2,C3,C4,C5,C6")
    q.add_argument("--test-section", default="C6")
    q.add_argument("--genes", default="markers")
    q.add_argument("--backbone", default="efficientnet_lite0")
    q.add_argument("--members", type=int, default=1)
    q.add_argument("--lr", type=float, default=1e-4)
    q.add_argument("--max-epochs", type=int, default=200)
    q.set_defaults(func=cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(message)s")
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        code = args.func(args)  # a command returns a non-zero code only when it printed why
    except StimageError as e:
        print(f"stimage: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stimage: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
