"""MASS (mask-guided in-context self-supervision) model parts: see model.py for the architecture notes."""
from nnssl_plugins.pretrain.mass.arch import (
    build_backbone,
    mass_arch_kwargs,
    mass_architecture_plans,
    resolve_arch_kwargs,
)
from nnssl_plugins.pretrain.mass.inference import decoder_features, pca_rgb, predict_volume
from nnssl_plugins.pretrain.mass.loss import hard_dice, mass_loss
from nnssl_plugins.pretrain.mass.model import MASSModel, TaskEmbedding, average_embeddings, build_mass_model

__all__ = [
    "MASSModel", "TaskEmbedding", "average_embeddings", "build_mass_model", "build_backbone",
    "mass_arch_kwargs", "mass_architecture_plans", "resolve_arch_kwargs", "mass_loss", "hard_dice",
    "predict_volume", "decoder_features", "pca_rgb",
]
