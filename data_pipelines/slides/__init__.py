"""Readers: spatial transcriptomics on disk → AnnData with stimage's keys."""

from data_pipelines.slides.h5ad import read_h5ad, validate_counts
from data_pipelines.slides.her2st import her2st_sections, read_her2st
from data_pipelines.slides.hest import hest_ids, read_hest
from data_pipelines.slides.visium import read_10x_h5, read_visium

__all__ = ["her2st_sections", "hest_ids", "read_hest", "read_10x_h5", "read_h5ad", "read_her2st", "read_visium", "validate_counts"]
