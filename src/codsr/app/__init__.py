"""``codsr app``: a Gradio web page for CODSR (optional extra ``codsr[app]``; docs/app.md).

:func:`build_app` builds the page around a loaded :class:`codsr.CODSRPipeline` and returns the
``gr.Blocks``; launching it (``demo.launch(server_name="127.0.0.1", ...)``) is the caller's, as in
``codsr app``. Jobs run through the same batch engine as ``codsr upscale`` (:mod:`codsr.app.jobs`).
Importing :mod:`codsr.app.ui` needs Gradio; the other modules do not.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AppConfig", "JobSettings", "build_app"]

from codsr.app.settings import AppConfig, JobSettings


def build_app(pipe: Any, **kwargs: Any):
    """:func:`codsr.app.ui.build_app` (imported on use: Gradio is an optional extra)."""
    try:
        from codsr.app.ui import build_app as _build
    except ImportError as exc:
        raise ImportError(
            f"codsr app needs Gradio ({exc}); install it with: pip install 'codsr[app]'"
        ) from exc
    return _build(pipe, **kwargs)
