"""``stimage clinical bulk|survival|response``: pseudo-bulk vs bulk RNA-seq, Cox / Kaplan–Meier
survival (lifelines), RBF-SVM drug response with nested CV (scikit-learn) — :mod:`export.clinical`."""

from __future__ import annotations

import json

from export.runtime.options import positive_int


def add_parser(sub, parents) -> None:
    p = sub.add_parser("clinical", parents=list(parents), help="bulk agreement, survival and drug response")
    csub = p.add_subparsers(dest="clinical_command", required=True, parser_class=type(p))
    tr = dict(choices=("auto", "log", "cpm", "none"), default="auto",
              help="auto: log1p for cohort.h5ad, log1p CPM for integer counts, else as is")

    b = csub.add_parser("bulk", parents=list(parents), help="per gene / per sample PCC and Spearman vs bulk")
    b.add_argument("--pred", required=True, help="cohort.h5ad or samples × genes CSV")
    b.add_argument("--bulk", required=True, help="samples × genes CSV (first column = sample id)")
    b.add_argument("--out", required=True)
    b.add_argument("--pred-transform", **tr)
    b.add_argument("--bulk-transform", **tr)
    b.set_defaults(func=_bulk)

    s = csub.add_parser("survival", parents=list(parents), help="univariate + CV multivariate Cox, KM split")
    s.add_argument("--expr", required=True, help="cohort.h5ad or samples × genes CSV")
    s.add_argument("--clinical", required=True, help="CSV, first column = sample id")
    s.add_argument("--time", required=True, help="survival time column")
    s.add_argument("--event", required=True, help="event column (1/0, true/false)")
    s.add_argument("--out", required=True)
    s.add_argument("--genes", type=positive_int, help="test only the N most variable genes (default all)")
    s.add_argument("--top", type=positive_int, default=5, help="genes in the multivariate model (default 5)")
    s.add_argument("--folds", type=positive_int, default=3)
    s.add_argument("--repeats", type=positive_int, default=100)
    s.add_argument("--by", help="also report the univariate Cox within each level of this clinical column")
    s.add_argument("--penalizer", type=float, default=0.1, help="ridge penalty of the multivariate Cox")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--transform", **tr)
    s.set_defaults(func=_survival)

    r = csub.add_parser("response", parents=list(parents), help="RBF SVM, nested stratified 5-fold CV AUC")
    r.add_argument("--expr", required=True, help="cohort.h5ad or samples × genes CSV")
    r.add_argument("--labels", required=True, help="CSV, first column = sample id")
    r.add_argument("--label", required=True, help="response column")
    r.add_argument("--positive", required=True, help="the value of --label that counts as a responder")
    r.add_argument("--out", required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--transform", **tr)
    r.set_defaults(func=_response)


def _bulk(a) -> int:
    from export.clinical.bulk import run_bulk

    print(json.dumps(run_bulk(a.pred, a.bulk, a.out, pred_transform=a.pred_transform,
                              bulk_transform=a.bulk_transform)))
    return 0


def _survival(a) -> int:
    from export.clinical.survival import run_survival

    r = run_survival(a.expr, a.clinical, a.time, a.event, a.out, n_genes=a.genes, top=a.top, folds=a.folds,
                     repeats=a.repeats, by=a.by, transform=a.transform, seed=a.seed, penalizer=a.penalizer)
    print(f"multivariate Cox of {', '.join(r['genes'])}: held-out c-index {r['c_index_mean']:.3f} ± "
          f"{r['c_index_sd']:.3f} ({r['folds']}-fold x {r['repeats']}); KM log-rank p = {r['logrank_p']:.3g} -> {a.out}")
    return 0


def _response(a) -> int:
    from export.clinical.response import run_response

    r = run_response(a.expr, a.labels, a.label, a.positive, a.out, transform=a.transform, seed=a.seed)
    print(f"RBF SVM nested CV AUC {r['auc_mean']:.3f} ± {r['auc_sd']:.3f} "
          f"(folds {', '.join(f'{x:.3f}' for x in r['auc_folds'])}) -> {a.out}")
    return 0
