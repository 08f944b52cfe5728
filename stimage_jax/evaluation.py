"""``stimage evaluate`` as a library call: score a prediction file against its truth file
and write the metrics CSV and the figures asked for.

The output set is all-or-nothing as far as a program can make it: every output path is
checked (not an input, not existing without ``overwrite``, not given twice, in a writable
folder), both inputs are read, the table, the calibration table and every figure are
computed and rendered to bytes — so any bad input fails here, with one
:class:`StimageError` line — and only then are the files written, each to a temporary
sibling, all renamed at the end.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from data_pipelines import keys
from data_pipelines.errors import StimageError

__all__ = ["EvaluationReport", "evaluate_files", "uncertainty_plot_path", "read_prediction"]


@dataclass(frozen=True)
class EvaluationReport:
    """What :func:`evaluate_files` scored and wrote.

    ``table``: one row per sample and gene (:func:`stimage_jax.metrics.evaluate`);
    ``missing``: predicted genes absent from the truth, not scored; ``summary``:
    :func:`stimage_jax.metrics.summarise` of the table; ``written``: every file written,
    the CSV first; ``out``: the CSV; ``level``: the central-interval level of the
    prediction's q_lo/q_hi (for the PIT message); ``figures``: (description, path) of each
    PNG written, in order.
    """

    table: pd.DataFrame
    missing: list[str]
    summary: dict
    written: list[Path]
    out: Path
    level: float
    figures: tuple[tuple[str, Path], ...] = ()

    def lines(self) -> list[str]:
        """The messages ``stimage evaluate`` prints, one string per line."""
        s, out = self.summary, []
        if self.missing:
            out.append(f"{len(self.missing)} predicted gene(s) absent from the truth, not scored: "
                       f"{', '.join(self.missing)}")
        out.append(f"{s['rows']} sample x gene rows: mean PCC {s['mean_pcc']:.3f}, median PCC {s['median_pcc']:.3f}, "
                   f"mean Spearman {s['mean_spearman']:.3f}, PCC > 0 for {s['n_pcc_positive']}, NaN {s['n_nan']}"
                   + (f", interval coverage {s['coverage']:.3f}" if "coverage" in s else "")
                   + (f", NB-mixture NLL {s['nll']:.3f}" if "nll" in s else "")
                   + (f", CRPS {s['crps']:.3f}" if "crps" in s else "")
                   + (f", PIT coverage {s['pit_coverage']:.3f} (nominal {self.level:g})"
                      if "pit_coverage" in s else "") + f" -> {self.out}")
        out += [f"{what} -> {path}" for what, path in self.figures]
        return out


def uncertainty_plot_path(out: str | os.PathLike, gene: str) -> Path:
    """``--plot-uncertainty GENE`` writes ``<out stem>_uncertainty_<GENE>.png`` beside
    ``out``; characters outside [0-9A-Za-z._-] in the gene become ``_``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_uncertainty_{re.sub(r'[^0-9A-Za-z._-]', '_', gene)}.png")


def read_prediction(path: str | os.PathLike):
    """Read a prediction .h5ad (predicted means in X); one StimageError line when it is
    missing, unreadable or has no X."""
    from data_pipelines.slides.h5ad import read_anndata

    path = Path(path)
    pred = read_anndata(path, "prediction file")
    if pred.X is None or pred.n_obs == 0 or pred.n_vars == 0:
        raise StimageError(f"prediction file {path} holds no predicted means "
                           f"({pred.n_obs} spots x {pred.n_vars} genes{', no X' if pred.X is None else ''})")
    return pred


def _check_outputs(outputs: list[Path], inputs: tuple[Path, ...], overwrite: bool) -> None:
    from data_pipelines.io import check_writable

    seen: dict[Path, Path] = {}
    for p in outputs:
        key = p.resolve()
        if key in seen:
            raise StimageError(f"output {p} is given twice (also as {seen[key]}); choose distinct names")
        seen[key] = p
        check_writable(p, overwrite, inputs=inputs)


def _write_all(files: list[tuple[Path, bytes]], overwrite: bool) -> None:
    """Write every file to its temporary sibling first, then rename them all, so a failed
    write (full disk) leaves none of the set renamed into place."""
    from data_pipelines.io import atomic_path

    with contextlib.ExitStack() as stack:
        for path, data in files:
            stack.enter_context(atomic_path(path, overwrite=overwrite)).write_bytes(data)


def evaluate_files(pred_path: str | os.PathLike, truth_path: str | os.PathLike, out: str | os.PathLike, *,
                   overwrite: bool = False, plot: str | os.PathLike | None = None,
                   plot_genes: list[str] | None = None, uncertainty_genes: list[str] | None = None,
                   calibration: str | os.PathLike | None = None) -> EvaluationReport:
    """Score ``pred_path`` (a prediction .h5ad) against ``truth_path`` (observed counts)
    and write ``out`` (metrics CSV, one row per sample and gene).

    Optional figures: ``plot`` — observed vs predicted maps of ``plot_genes`` (default the
    two best by PCC); ``uncertainty_genes`` — one PNG each at
    :func:`uncertainty_plot_path` (mean, aleatoric and epistemic SD; observed counts too
    when the truth has the gene); ``calibration`` — observed vs nominal coverage PNG
    (needs the members' NB parameters). Predicted genes the truth lacks are listed in
    ``missing`` and skipped. Bad input — an output that exists (without ``overwrite``),
    is an input or is given twice; a missing or corrupt file; an unknown gene — raises
    :class:`StimageError` before any file is written.
    """
    from data_pipelines.slides import read_h5ad
    from stimage_jax import plots
    from stimage_jax.metrics import calibration_table, evaluate, match_prediction, prediction_level, summarise

    pred_path, truth_path, out = Path(pred_path), Path(truth_path), Path(out)
    unc_paths = {g: uncertainty_plot_path(out, g) for g in dict.fromkeys(uncertainty_genes or ())}
    plot = Path(plot) if plot else None
    calibration = Path(calibration) if calibration else None
    outputs = [out, *([plot] if plot else []), *unc_paths.values(), *([calibration] if calibration else [])]
    _check_outputs(outputs, (pred_path, truth_path), overwrite)

    pred, truth = read_prediction(pred_path), read_h5ad(truth_path)
    unknown = [g for g in unc_paths if g not in set(pred.var_names)]
    if unknown:
        raise StimageError(f"--plot-uncertainty: gene(s) not in the prediction: {', '.join(unknown)}")
    if plot_genes:
        _, _, _, absent = match_prediction(pred, truth, plot_genes)  # unknown to the prediction: raises
        if absent:
            raise StimageError(f"--plot-genes: gene(s) absent from the truth: {', '.join(absent)}")
    if plot and keys.SPATIAL not in truth.obsm:
        raise StimageError(f"--plot: truth {truth_path} has no obsm['spatial'] coordinates to plot")

    cal = calibration_table(pred, truth) if calibration else None
    table, missing = evaluate(pred, truth)
    files: list[tuple[Path, bytes]] = [(out, table.to_csv(index=False).encode())]
    figures: list[tuple[str, Path]] = []
    if plot:
        genes = list(plot_genes) if plot_genes else \
            list(table.sort_values("pcc", ascending=False)["gene"].drop_duplicates()[:2])
        files.append((plot, plots.png_bytes(plots.spatial_genes_figure(pred, truth, genes))))
        figures.append((f"spatial maps of {', '.join(genes)}", plot))
    truth_genes = set(truth.var_names)
    for g, p in unc_paths.items():
        fig = plots.uncertainty_maps_figure(pred, g, truth=truth if g in truth_genes else None)
        files.append((p, plots.png_bytes(fig)))
        figures.append((f"mean, aleatoric and epistemic SD maps of {g}", p))
    if cal is not None:
        files.append((calibration, plots.png_bytes(plots.calibration_figure(cal))))
        figures.append((f"coverage calibration over {len(cal)} nominal levels", calibration))

    _write_all(files, overwrite)
    return EvaluationReport(table=table, missing=missing, summary=summarise(table), written=[p for p, _ in files],
                            out=out, level=prediction_level(pred), figures=tuple(figures))
