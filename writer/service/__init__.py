"""The writer process: its configuration (``config``), the service that follows the sessions'
scans and runs one scan writer each (``service``), its metrics and logs.

May import: ``protocols``, ``scan``, ``state``, ``hdf5``, ``blissdata``.
"""
