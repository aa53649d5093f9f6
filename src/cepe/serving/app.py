"""The HTTP application, split by job: `middleware` (Gate), `service` (Service, ServeConfig),
`routes` (create_app); errors and bodies live in `protocol`. Kept as the import path
`cepe.serving.app` used by `cepe serve`."""

from .routes import API_KEY_ENV, create_app
from .service import ServeConfig

__all__ = ["API_KEY_ENV", "ServeConfig", "create_app"]
