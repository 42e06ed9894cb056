"""`blisswriter serve`: scans in a web browser, live. h5web (the field's HDF5 viewer, built
into `static/` from `frontend/`) over h5grove's building blocks, plus the writer's list of
scans; files only from the data roots, opened without ever locking against the writer.

`access` (what may be read, how files are opened), `content` (h5grove's answers),
`listing` (scans, folders), `server` (the HTTP transport).

May import: ``state``, ``blissdata``.
"""
