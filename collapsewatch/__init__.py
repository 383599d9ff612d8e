"""collapsewatch: catch embedding collapse while metric-learning models train."""

from collapsewatch import losses
from collapsewatch._version import __version__

__all__ = ["__version__", "losses"]
