"""The ReFound model (paper 4.1): multi-modal geospatial embedding, MoGE transformer, heads."""
from refound_core.model.config import ModelConfig, PRESETS, preset  # noqa: F401
