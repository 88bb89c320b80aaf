"""Attribution methods (one module per method); torch only, no I/O.

``shared.attribution.config`` is pure Python; the method modules import torch.
"""
