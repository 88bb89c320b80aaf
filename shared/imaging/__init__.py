"""Images in and out of the service.

* :mod:`shared.imaging.decode` -- turn untrusted uploaded bytes into an upright
  ``(H, W, 3)`` ``uint8`` RGB array, refusing anything that is not a supported,
  complete, reasonably sized image (Pillow + numpy only, safe for the web side).
* :mod:`shared.imaging.render` -- heatmaps, overlays and the artifact files of
  an explanation (numpy, Pillow and OpenCV; imported by the worker).

This package deliberately imports neither sub-module, so that importing
``shared.imaging.decode`` never pulls in OpenCV.
"""
