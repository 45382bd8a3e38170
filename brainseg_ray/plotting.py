"""matplotlib without a display: bare Figures on the Agg canvas, and their PNG bytes.

Every chart of the project (data profile, training curves, lr-find, evaluation report) starts
here. No pyplot: its registry keeps every figure alive until closed (a leak when one process
draws many), and `matplotlib.use` would switch the backend of the whole process.
"""

from __future__ import annotations

import io


def new_figure(figsize: tuple[float, float], **kwargs):
    """A matplotlib Figure of `figsize` inches on an Agg canvas; kwargs go to Figure (e.g. layout)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig, dpi: float = 100) -> bytes:
    """`fig` as PNG bytes. Nothing to close afterwards: dropping the last reference frees a bare
    Figure (fig.clear() would only cost time rebuilding empty axes)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
