"""The live dashboard (Dash + plotly): ``collapsewatch dashboard LOGDIR``.

Importing this module imports Dash; the core ``collapsewatch`` package never does.
"""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
