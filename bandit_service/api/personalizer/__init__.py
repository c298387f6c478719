"""Azure Personalizer-compatible API (``/personalizer``): see :mod:`.routes`."""

from bandit_service.api.personalizer.routes import document, router

__all__ = ["document", "router"]
