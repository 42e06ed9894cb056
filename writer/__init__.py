"""The NeXus writer: follows new scans, writes each into HDF5, hands its streams to the files.

The package is in rooms, each importing only from the rooms below it (and from
``blissdata``); ``tests/test_layout.py`` checks it. From the top:

- ``commands``: what a user runs (``blisswriter run/status/end/validate/rewrite/serve``, the
  demo).
- ``web``: the web view (h5web over h5grove) that ``blisswriter serve`` starts.
- ``service``: the long-running process: configuration, following the sessions' scans, one
  scan writer per scan, metrics and logs.
- ``protocols``: the scans of other producers (ESRF's blissdata 2.x), adapted to the scan
  writer.
- ``scan``: writing one scan: its life (wait, finalize, fail, pause), its NeXus entry, and the
  pump that reads events, appends, flushes and publishes watermarks.
- ``state``: what writers share in Redis: each scan's status, the pool of writers, leases.
- ``hdf5``: files and datasets, knowing nothing of Redis: locks and flags, the shared file,
  appenders, chunking, compression, partial chunks, references.

docs/architecture.md follows a point through them.
"""
