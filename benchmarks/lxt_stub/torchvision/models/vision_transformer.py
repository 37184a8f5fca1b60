"""Stub: LXT's ViT patch map reads ``vision_transformer.nn``."""

from torch import nn  # noqa: F401
