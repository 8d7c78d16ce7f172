"""napari-emseg: interactive EM segmentation for napari.

Importing this package is cheap: torch, napari and Qt are imported lazily by
the modules that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
