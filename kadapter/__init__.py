"""kadapter: K-Adapters — knowledge adapters beside a frozen pre-trained encoder.

Modules: ``config`` (typed presets), ``io`` (atomic outputs, manifests), ``modeling``
(adapters, the frozen-encoder wrapper, checkpoints), ``tiny`` (the offline sample
model), ``spans`` (entity markers and span pooling), and one module per stage.
Importing the package has no side effects and does not import torch.
"""

__version__ = "0.1.0"
