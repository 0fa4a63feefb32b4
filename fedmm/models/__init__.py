"""Models: per-modality encoders, fusion by name, task heads and objectives.

Every model here passes Opacus' ``ModuleValidator`` as it is. Build one with
:class:`ModelRecipe` (``ModelRecipe.from_config(cfg)``), so the server and the
sites build the same model; :func:`evaluate`, :func:`predict` and :func:`score` (accuracy, macro-F1, per class,
confusion matrix: :mod:`fedmm.models.metrics`) score one on a split.

May import ``fedmm.config``/``errors``/``protocol`` and ``fedmm.data`` only.
"""

from fedmm.models.fusion import AttentionFusionNet, ConcatFusionNet, EmbeddingFusionNet, FusionNet, GatedFusionNet, LateFusionNet
from fedmm.models.objective import Objective, OutputLayout
from fedmm.models.evaluation import Scores, evaluate, predict, score, task_accuracies
from fedmm.models.metrics import ClassificationReport, ClassScores, classification_report
from fedmm.models.options import ModelOptions
from fedmm.models.recipe import ModelRecipe, pretrained_image_features, save_image_encoder
from fedmm.models.registry import ModelSpec, encoder_for, layout_fingerprint, model_card, model_names, model_spec, register_model

__all__ = [
    "FusionNet", "ConcatFusionNet", "GatedFusionNet", "LateFusionNet", "AttentionFusionNet", "EmbeddingFusionNet",
    "Objective", "OutputLayout", "evaluate", "predict", "task_accuracies", "score", "Scores",
    "ClassificationReport", "ClassScores", "classification_report",
    "ModelOptions", "ModelRecipe", "pretrained_image_features", "save_image_encoder",
    "ModelSpec", "register_model", "model_names", "model_spec", "encoder_for", "layout_fingerprint", "model_card",
]
