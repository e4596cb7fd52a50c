"""Evaluation: data sets and prompt templates (datasets.py), metrics on predictions and
embeddings (metrics.py), and the rank-sharded evaluators that run a model (evaluators.py):
zero-shot, retrieval, linear probe, and a classifier's predictions."""
from .datasets import has_split, load_captions, load_classification, resolve_templates, TEMPLATE_PRESETS
from .evaluators import (EVALUATORS, embed_images, embed_texts, linear_probe_eval, predict, register_evaluator,
                         retrieval_eval, run_evaluations, zeroshot_classifier, zeroshot_eval)
from .metrics import classification_metrics, fit_logistic, logistic_probe, recall_curve, retrieval_ranks, topk_accuracy

__all__ = ["EVALUATORS", "TEMPLATE_PRESETS", "classification_metrics", "embed_images", "embed_texts", "fit_logistic",
           "has_split", "linear_probe_eval", "load_captions", "load_classification", "logistic_probe", "predict",
           "recall_curve", "register_evaluator", "resolve_templates", "retrieval_eval", "retrieval_ranks",
           "run_evaluations", "topk_accuracy", "zeroshot_classifier", "zeroshot_eval"]
