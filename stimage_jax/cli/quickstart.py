"""``stimage quickstart``: the README's main job on the shipped HER2ST data — train on
four C sections (the last for early stopping), predict the fifth, score it, draw it."""

from __future__ import annotations

from pathlib import Path

from data_pipelines.errors import StimageError
from data_pipelines.paths import shared_dir
from export.runtime.context import TTA_VIEWS
from stimage_jax.cli.common import csv, positive_float, positive_int, quiet, unit_fraction


def add_parser(sub, parents) -> None:
    q = sub.add_parser("quickstart", parents=list(parents), help="the main job on the shipped HER2ST data")
    q.add_argument("--shared", default=str(shared_dir()), help="the shared/ data folder")
    q.add_argument("--workdir", default="runs/quickstart")
    q.add_argument("--sections", default="C2,C3,C4,C5,C6")
    q.add_argument("--test-section", default="C6")
    q.add_argument("--genes", default="markers")
    q.add_argument("--backbone", default="efficientnet_lite0")
    q.add_argument("--members", type=positive_int, default=5, help="ensemble members (their spread is the epistemic uncertainty)")
    q.add_argument("--lr", type=positive_float, default=1e-4)
    q.add_argument("--max-epochs", type=positive_int, default=200)
    # 1 view keeps the main job under two minutes on 2 cores (8 views: PCC 0.381 -> 0.461, ~6 min)
    q.add_argument("--tta", type=int, choices=TTA_VIEWS, default=1,
                   help="test-time views averaged per tile (default 1 here, to stay under two minutes; "
                        "stimage train's default is 8)")
    q.add_argument("--smooth", type=unit_fraction, default=None, help="spatial smoothing weight (default 0.5)")
    q.set_defaults(func=run)


def run(a) -> None:
    from data_pipelines.io import atomic_path, write_h5ad
    from data_pipelines.slides import read_h5ad, read_her2st
    from stimage_jax import plots
    from stimage_jax.evaluation import evaluate_files
    from stimage_jax.pipeline import predict, train

    root, wd, sections = Path(a.shared) / "data" / "her2st", Path(a.workdir), csv(a.sections)
    if a.test_section not in sections:
        raise StimageError(f"--test-section {a.test_section} is not among --sections {a.sections}")
    if len(sections) < 3:  # two to train (the last for early stopping) and one to test
        raise StimageError(f"--sections needs at least 3 sections (got {', '.join(sections) or 'none'})")
    paths = {}
    for s in sections:
        p = wd / "data" / f"{s}.h5ad"
        if not p.exists():
            write_h5ad(read_her2st(root, s, require_image=True), p)
        paths[s] = p
    train_secs = [s for s in sections if s != a.test_section]
    print(f"[1/3] training on {', '.join(train_secs)} (validation {train_secs[-1]}), genes: {a.genes}")
    # The quickstart owns its workdir: a changed setting or input retrains instead of refusing.
    model = train([paths[s] for s in train_secs], wd / "model_run", genes=a.genes, backbone=a.backbone,
                  members=a.members, lr=a.lr, max_epochs=a.max_epochs, tta=a.tta, smooth=a.smooth,
                  progress=not quiet(a), overwrite=True)
    print(f"[2/3] predicting {a.test_section}")
    pred = predict(read_h5ad(paths[a.test_section]), model, progress=not quiet(a))
    write_h5ad(pred, wd / f"{a.test_section}_pred.h5ad", overwrite=True)
    print(f"[3/3] evaluating {a.test_section}")
    report = evaluate_files(wd / f"{a.test_section}_pred.h5ad", paths[a.test_section], wd / "metrics.csv",
                            overwrite=True)
    print("\n".join(report.lines()))
    # The figure shows what STimage is: for the two best genes, observed counts, the ensemble's
    # mean and where its members disagree (epistemic SD), over the H&E.
    best = list(report.table.sort_values("pcc", ascending=False)["gene"].drop_duplicates()[:2])
    truth = read_h5ad(paths[a.test_section])
    image, scale = plots.he_thumbnail(truth)
    png = plots.png_bytes(plots.he_overlay_figure(pred, truth, best, image, scale))
    with atomic_path(wd / "spatial_maps.png") as tmp:
        tmp.write_bytes(png)
    s = report.summary
    print(f"{a.members}-member ensemble on {a.test_section}: mean PCC {s['mean_pcc']:.3f}"
          + (f", 80 % interval coverage {s['coverage']:.3f}" if "coverage" in s else "")
          + (f", PIT coverage {s['pit_coverage']:.3f}" if "pit_coverage" in s else ""))
    print(f"H&E with observed counts, predicted mean and epistemic SD of {', '.join(best)} -> {wd / 'spatial_maps.png'}")
