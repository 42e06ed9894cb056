"""Files and datasets, knowing nothing of Redis or scans: opening, locking and flagging files
(``files``), the shared file and its links, where files may go (``paths``), appending points
to chunked, compressed datasets (the appenders, ``chunking``, ``compression``,
``partial_chunks``), references to other files, and the checks of a file being written.

May import: ``blissdata``'s pure helpers (encodings, bslz4, point shapes), nothing that
talks to Redis, nothing else of ``writer``.
"""
