"""``python -m napari_emseg.cli``: the same as the ``emseg`` script."""

import sys

from . import main

sys.exit(main())
