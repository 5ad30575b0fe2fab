"""Pruning and sparsity: masks, one-shot and training-time pruning, channel permutation
for N:M, and compressed sparse storage.

Like ``slimformer.quant``, importing the package imports every module in it, so each
technique's Transform (and module type for saved models) is registered.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
