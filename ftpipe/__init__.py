"""Shared code for the fine-tuning pipeline's stages: params, data IO, model loading, metrics, tracking.

Each module is small and single-purpose; stages import what they need. Nothing heavy happens at
import time (torch, transformers and mlflow are imported inside the functions that use them).
"""
