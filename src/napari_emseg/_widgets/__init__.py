"""napari dock widgets (one module per widget); imported lazily by npe2.

Each widget runs its long work in a napari worker thread (see
:mod:`.jobs`), reports through napari progress bars, can be cancelled and
shows errors as notifications. Nothing here imports torch at module level.
"""
