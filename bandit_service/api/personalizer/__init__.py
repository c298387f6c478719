"""Azure Personalizer-compatible API (``/personalizer``): see :mod:`.routes`."""

from bandit_service.api.personalizer.routes import router

__all__ = ["router"]
