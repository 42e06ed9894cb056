"""Scans published by other producers, adapted to the scan writer. The native protocol (this
project's ``blissdata``) needs no adapter: ``writer.scan`` reads it.

- ``blissdata2``: ESRF's blissdata 2.x (BLISS), written as blisswriter 3.0.0 writes it.

May import: ``scan``, ``state``, ``hdf5``, ``blissdata``.
"""
