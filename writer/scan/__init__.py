"""Writing one scan into its HDF5 file: the scan's life (wait for it, write, finalize, fail,
pause), its NeXus entry built from the scan's ``mapping``, and the pump that reads events,
appends them, flushes within ``max_lag_s`` and publishes the watermarks.

May import: ``state``, ``hdf5``, ``blissdata``.
"""
