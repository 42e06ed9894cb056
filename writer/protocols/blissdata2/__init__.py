"""Follow and write scans published by ESRF's blissdata 2.x (what BLISS uses), as
blisswriter 3.0.0 writes them: the file(s) and tree named in ``scan.info["h5maps"]``.

Read from the source of PyPI ``blissdata==2.4.5`` (redis_engine/store.py, scan.py,
streams/event_stream.py, streams/encoding/{numeric,json}.py, h5map/{data_items,hdf5_items}.py)
and ``blisswriter==3.0.0`` (scan_writer.py, stream_writers.py, json_h5_utils.py). Both share
the import name ``blissdata`` with this project, so this module speaks the protocol with
redis-py directly and never imports them.

The protocol (blissdata 2.4.5, ``_PROTOCOL_VERSION_`` = 1; needs RedisJSON + RediSearch):

- ``_SCAN_HISTORY_``: a stream, one entry ``{key: <scan key>}`` per created scan.
- ``<prefix>:scan:<pk>`` (prefix ``esrf``): a RedisJSON document ``{pk, id: {name, number,
  data_policy, session, proposal, collection, dataset, path}, info, state_stream: {pk},
  data_streams: {name: {pk, encoding, info}}}``. A key whose TTL is 0-10 s is deleted.
- ``<prefix>:stream:<pk>``: Redis streams. The state stream's entries are ``{state: 0..4}``
  (CREATED, PREPARED, STARTED, STOPPED, CLOSED). A data stream's entry ``<first index>-1``
  holds ``payload`` (and ``len`` when it has more than one point); the seal is the entry
  ``2**64-1 - 2**64-1`` with ``{id: <total points>}``.
- encodings: ``{"type": "numeric", "dtype_str": "<f8", "shape": [...]}`` (payload = the C
  order bytes of ``len`` points; with a -1 in shape, msgpack ``[point shape, bytes]``), and
  ``{"type": "json"}`` (one JSON value per entry).
- ``info["h5maps"]``: ``{absolute file path: h5map Group}``; info may change only at
  PREPARED and at CLOSED (blissdata asserts it), so the final h5maps is applied at the end.

Lima streams (plugin ``lima``, read from blissdata/streams/lima and lima/client.py; written
as blisswriter's stream_writers.LimaStreamWriter): a virtual dataset onto the detector's
HDF5 files (writer/hdf5/references.py); lima2 streams (blissdata_lima2 2.0.2, Lima2StreamWriter):
an external link to the detector's master file, at the end. A scan without ``path`` or
``h5maps`` is skipped (as blisswriter 3.0.0 does). What this version cannot write (another
encoding, a plugin other than lima, lima2 and hdf5_fallback, lima files other than HDF5, a
virtual dataset node, an unknown node or data item type, streams in another file than the
scan's own) fails the scan with a reason naming it.
"""
