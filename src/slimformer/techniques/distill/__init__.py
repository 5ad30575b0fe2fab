"""Smaller students for distillation (layer dropping); the distillation losses live in ``train/losses.py``."""
