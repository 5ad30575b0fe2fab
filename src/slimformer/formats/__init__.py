"""Ground floor: quantisation specs and primitives, bit packing, sparsity masks and the one
description of a compressed matrix. Pure tensor math: nothing here imports ``torch.nn``
or any other slimformer package but ``errors`` and ``util``."""
