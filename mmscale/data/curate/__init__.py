"""Curation of a shard set in one resharding pass (mmscale-curate): exact and near-duplicate
images, decontamination against evaluation sets, optional duplicate captions, and DataComp's
CLIP-score filter; the kept samples are written, bytes unchanged, as a new shard set with the
index `data.type: shards` reads.

hashing.py (what a sample's image and caption hash to), neardup.py (pairs within a Hamming radius
by multi-index hashing; which duplicate is kept), scoring.py (CLIP scores in batches on a device),
plan.py (the verdict of every sample), pipeline.py (the pass: per-shard work files that make it
resumable, ranks under torchrun, the output shards, index and summary).
"""
from .pipeline import CurateError, CurateOptions, EvalSet, curate

__all__ = ["CurateError", "CurateOptions", "EvalSet", "curate"]
