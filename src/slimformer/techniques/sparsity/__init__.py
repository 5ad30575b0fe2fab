"""Pruning and sparsity techniques (one-shot magnitude, N:M with permutation, GMP, STE/SR-STE, Top-KAST, rewinding)."""
