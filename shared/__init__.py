"""explain-black-box common package.

Sub-packages are split by dependency so the web side never imports torch:

* ``shared.attribution`` -- the Meaningful Perturbation algorithm (torch only);
* ``shared.attribution.config`` -- its frozen configuration (pure Python);
* ``shared.imaging`` -- decoding uploads (Pillow) and rendering results;
* ``shared.models`` -- the model registry (torch, torchvision, timm) and labels;
* ``shared.db`` -- SQLAlchemy models, sessions and Alembic migrations;
* ``shared.settings`` -- configuration read from the environment.
"""

__version__ = "0.1.0"
