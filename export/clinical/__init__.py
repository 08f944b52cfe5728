"""Clinical analyses of cohort predictions (JAX-free): agreement with bulk RNA-seq
(:mod:`~export.clinical.bulk`), survival (:mod:`~export.clinical.survival`, lifelines) and
drug response (:mod:`~export.clinical.response`, scikit-learn RBF SVM, nested CV)."""
