"""Figures as PNG files without a display: the one place that selects matplotlib's headless Agg backend (a stage
runs in Prefect workers, torchrun ranks and CI, none of which has a screen). `from dsv3.plotting import plt`."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt"]
