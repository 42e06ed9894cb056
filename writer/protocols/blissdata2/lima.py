"""Lima (lima_v1) and Lima2 streams of blissdata 2: where their frames are, and how
blisswriter 3.0.0 writes them (a virtual dataset; an external link)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from blissdata.encoding import StreamDefinition

from .protocol import Bliss2Error


class LimaSavingOff(Bliss2Error):
    """A lima stream whose frames are not saved: blisswriter 3.0.0 writes no dataset."""


@dataclass
class LimaFiles:
    """Where a lima (lima_v1) stream's frames are: blissdata 2.4.5's lima/client.py.

    The stream's events are statuses ``{"last_index", "last_index_saved"}``: frames
    0..last_index exist; frame ``i`` is in file ``file_path % number`` at ``data_path``,
    index ``frame_in_file``, files numbered from ``file_offset``, ``frame_per_file`` frames
    each, restarting with every acquisition of ``frame_per_acquisition`` frames."""
    name: str
    definition: StreamDefinition
    file_path: str | None = None
    data_path: str | None = None
    file_format: str | None = None
    file_offset: int = 0
    frames_per_file: int = 0
    frames_per_acquisition: int = 0

    @classmethod
    def from_info(cls, name: str, info: dict) -> "LimaFiles":
        lima = info.get("lima_info")
        try:
            if lima.get("protocol_version") != 1:
                raise Bliss2Error(f"stream {name!r}: lima protocol version "
                                  f"{lima.get('protocol_version')!r}, this writer reads 1")
            dtype = np.dtype(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            files = cls(name, StreamDefinition(name=name, encoding="references",
                                               dtype=dtype.str, shape=shape, info=info),
                        frames_per_acquisition=int(lima["frame_per_acquisition"]))
            if "file_path" in lima:
                files.file_path, files.data_path = str(lima["file_path"]), lima["data_path"]
                files.file_format = str(lima["file_format"])
                files.file_offset = int(lima["file_offset"])
                files.frames_per_file = int(lima["frame_per_file"])
        except Bliss2Error:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise Bliss2Error(f"stream {name!r}: lima stream info unreadable "
                              f"({type(exc).__name__}: {exc}): {json.dumps(info)[:200]}") from None
        if dtype.kind not in "biufc" or not shape or any(d < 1 for d in shape):
            raise Bliss2Error(f"stream {name!r}: lima frames of dtype {dtype} and shape "
                              f"{shape} are not written by this writer version")
        if files.file_path is not None and not files.file_format.upper().startswith("HDF5"):
            raise Bliss2Error(f"stream {name!r}: lima saves its frames as "
                              f"{files.file_format}; only HDF5 files can be referenced "
                              "(blisswriter 3.0.0 writes a virtual dataset onto them that "
                              "cannot be read)")
        return files

    @property
    def saved(self) -> bool:
        return self.file_path is not None

    def reference(self, frame: int, saving_dir: str | None) -> dict:
        """The frame's file (relative to the scan file's folder when it is below it, as
        blisswriter 3.0.0 writes it), dataset and index in that dataset."""
        acquisition, in_acquisition = divmod(frame, self.frames_per_acquisition) \
            if self.frames_per_acquisition else (0, frame)
        in_file_number, in_file = divmod(in_acquisition, self.frames_per_file) \
            if self.frames_per_file else (0, in_acquisition)
        files_per_acquisition = -(-self.frames_per_acquisition // self.frames_per_file) \
            if self.frames_per_file else 1
        number = acquisition * files_per_acquisition + in_file_number + self.file_offset
        path = self.file_path % number
        if saving_dir is not None:
            try:
                path = str(PurePosixPath(path).relative_to(saving_dir))
            except ValueError:
                pass
        return {"file": path, "dataset": self.data_path, "index": in_file}


LIMA2_PROTOCOL_VERSION = 2  # blissdata_lima2 2.0.2 (Lima2Stream.PROTOCOL_VERSION)


def lima2_definition(name: str, info: dict) -> StreamDefinition:
    """A Lima2 stream (plugin ``lima2``): its events are uint32 counts of the frames the
    detector holds; the frames are in its own files, behind ``info["master_file"]``
    ``[file, dataset]`` (blisswriter 3.0.0 links to it: Lima2StreamWriter)."""
    if info.get("protocol_version") != LIMA2_PROTOCOL_VERSION:
        raise Bliss2Error(f"stream {name!r}: lima2 protocol version "
                          f"{info.get('protocol_version')!r}, this writer reads "
                          f"{LIMA2_PROTOCOL_VERSION}")
    master = info.get("master_file")
    if master is None:
        raise Bliss2Error(f"stream {name!r}: lima2 stream without a master file, its frames "
                          "are in no file (blisswriter 3.0.0 cannot save it either)")
    if not (isinstance(master, (list, tuple)) and len(master) == 2
            and all(isinstance(m, str) and m for m in master)):
        raise Bliss2Error(f"stream {name!r}: lima2 master_file {master!r} is not "
                          "[file, dataset]")
    return StreamDefinition(name=name, encoding="numeric", dtype="<u4", shape=(), info=info)
