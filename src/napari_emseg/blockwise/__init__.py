"""Out-of-core prediction and instance segmentation, block by block, zarr to zarr.

Volumes larger than memory are cut into blocks aligned with the chunks of a
zarr target (``block_shape``), so two blocks never write the same chunk.

* :func:`predict_blockwise` reads each block with a halo (clipped at the
  volume border), runs :func:`napari_emseg.predict.predict_volume` on it with
  a normalisation range computed once over the whole source, and writes the
  block's core.  A small marker file per finished block
  (``<target>/.emseg_done/<z>_<y>_<x>``, holding the SHA-256 of the block as
  read back from the target) makes runs **resumable**: after a crash or a
  cancel only the missing blocks are computed, and a block whose data no
  longer matches its marker (deleted, changed or corrupt chunk) is computed
  again.
* :func:`label_blockwise` labels each block (connected components, or a
  seeded watershed on the block plus its halo), **stitches ids across block
  faces** with a union-find over the face pairs, and renumbers the ids to
  1..N, block by block.  Blockwise connected components equal
  ``scipy.ndimage.label`` of the whole mask (same connectivity) up to the
  order of the ids.
* :func:`track_blockwise` links per-slice instances of a zarr volume with
  :func:`napari_emseg.tracking.track_slices`, streaming slices.

Work runs on local threads, or on a ``dask.distributed`` cluster when a
``client`` (or a scheduler address) is given: one task per block, the model
shipped as a checkpoint (or a name / path) and loaded once per worker process;
workers with a GPU use it automatically.  Memory stays bounded by a few blocks
per worker (plus, for labelling, one id lookup table of O(number of objects)).

Halo rule: along every axis that is split into several blocks the block must
be **larger than the halo** (``block > halo``); 2.5D models need a z halo of at
least their ``context``.

Modules, in the order a run uses them:

* :mod:`.grid` — block indices, core and halo slices, the halo rule;
* :mod:`.arrays` — sources (paths, arrays) and zarr targets;
* :mod:`.model` — model settings, identity, shipping to workers;
* :mod:`.executor` — one task per block on threads or a dask cluster;
* :mod:`.predict` and :mod:`.resume` — blockwise prediction and its verified resume;
* :mod:`.label` and :mod:`.stitch` — label blocks → merge across faces
  (union-find) → write the mapping;
* :mod:`.track` — slice-to-slice linking, streaming slabs.

torch is imported only when a model runs; ``distributed`` only with a client.
"""

from __future__ import annotations

from .executor import connect_client
from .grid import DEFAULT_BLOCK, block_grid
from .label import label_blockwise
from .model import default_halo
from .predict import predict_blockwise
from .track import track_blockwise

__all__ = [
    "DEFAULT_BLOCK",
    "block_grid",
    "connect_client",
    "default_halo",
    "label_blockwise",
    "predict_blockwise",
    "track_blockwise",
]
