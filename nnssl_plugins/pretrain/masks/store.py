"""On-disk store of many binary 3D masks for one case (MASS pretraining targets).

File layout (little-endian, no pickle anywhere)::

    b"NNSSLMSK"            8 bytes magic
    uint32 format version
    uint64 header length H
    H bytes                UTF-8 JSON header (see below)
    payload                concatenated per-mask blobs
    b"NNSSLEND"            8 bytes end magic (a truncated file never has it)

Header JSON::

    {"version", "shape": [X,Y,Z] (preprocessed grid, = image.shape[1:]), "backend", "params",
     "codec": "blosc2-zstd"|"zlib", "num_masks", "payload_size", "case_id",
     "masks": {"bbox": [[x0,x1,y0,y1,z0,z1], ...], "offset": [...], "nbytes": [...],
               "crc32": [...], "voxels": [...], "score": [...], "seed_axis": [...],
               "seed_slice": [...], "source": [...]}}

Each mask is stored as its bounding-box crop, bit-packed (``np.packbits`` of the C-ordered crop)
and compressed; one mask is read with a single ``os.pread`` of its blob (random access, no other
mask is touched). The file content is a pure function of the masks and parameters (no
timestamps), so reruns are byte-identical. Blobs carry a CRC32 that is checked on every read. ``MaskStore.open`` checks
magic, version, header, total file size and end magic, and raises ``UserInputError`` naming the
file and the fix for any corrupt or truncated file.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnssl_plugins.errors import UserInputError
from nnssl_plugins.utils.io import atomic_path

MAGIC = b"NNSSLMSK"
END_MAGIC = b"NNSSLEND"
FORMAT_VERSION = 1
STORE_EXT = ".nnsslmask"
_PRE = struct.Struct("<8sIQ")

META_KEYS = ("voxels", "score", "seed_axis", "seed_slice", "source")


def _codec_default() -> str:
    try:
        import blosc2  # noqa: F401

        return "blosc2-zstd"
    except Exception:  # pragma: no cover
        return "zlib"


def _compress(raw: bytes, codec: str) -> bytes:
    if codec == "blosc2-zstd":
        import blosc2

        return blosc2.compress(raw, typesize=1, clevel=5, codec=blosc2.Codec.ZSTD)
    if codec == "zlib":
        return zlib.compress(raw, 6)
    raise ValueError(codec)


def _decompress(blob: bytes, codec: str) -> bytes:
    if codec == "blosc2-zstd":
        import blosc2

        return blosc2.decompress(blob)
    if codec == "zlib":
        return zlib.decompress(blob)
    raise ValueError(codec)


def bbox_of(mask: np.ndarray) -> Optional[Tuple[int, ...]]:
    """(x0,x1,y0,y1,z0,z1) half-open bounding box of a 3D bool array, or None if empty."""
    out = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        proj = np.any(mask, axis=other)
        idx = np.flatnonzero(proj)
        if idx.size == 0:
            return None
        out += [int(idx[0]), int(idx[-1]) + 1]
    return tuple(out)


def bbox_slices(bbox: Sequence[int]) -> Tuple[slice, ...]:
    return tuple(slice(int(bbox[2 * i]), int(bbox[2 * i + 1])) for i in range(len(bbox) // 2))


class CroppedMask:
    """A mask held as (bbox, bool crop). Memory-light representation used by all backends."""

    __slots__ = ("bbox", "crop", "meta")

    def __init__(self, bbox: Sequence[int], crop: np.ndarray, meta: Optional[Dict[str, Any]] = None):
        self.bbox = tuple(int(b) for b in bbox)
        self.crop = np.ascontiguousarray(crop, dtype=bool)
        self.meta = dict(meta or {})

    @classmethod
    def from_dense(cls, mask: np.ndarray, meta=None) -> Optional["CroppedMask"]:
        bb = bbox_of(mask)
        if bb is None:
            return None
        return cls(bb, mask[bbox_slices(bb)], meta)

    @property
    def voxels(self) -> int:
        return int(self.crop.sum())

    def dense(self, shape) -> np.ndarray:
        out = np.zeros(shape, dtype=bool)
        out[bbox_slices(self.bbox)] = self.crop
        return out


def write_store(path: str, shape: Sequence[int], masks: Sequence[CroppedMask], backend: str,
                params: Dict[str, Any], case_id: str = "", codec: Optional[str] = None) -> None:
    """Write all masks of one case atomically (temp file + fsync + os.replace)."""
    codec = codec or _codec_default()
    shape = [int(s) for s in shape]
    cols: Dict[str, List[Any]] = {k: [] for k in ("bbox", "offset", "nbytes", "crc32") + META_KEYS}
    blobs = []
    off = 0
    for m in masks:
        bb = list(m.bbox)
        for i in range(3):
            if not (0 <= bb[2 * i] < bb[2 * i + 1] <= shape[i]):
                raise ValueError(f"bbox {bb} outside grid {shape}")
        if tuple(m.crop.shape) != tuple(bb[2 * i + 1] - bb[2 * i] for i in range(3)):
            raise ValueError("crop shape does not match bbox")
        blob = _compress(np.packbits(m.crop.ravel()).tobytes(), codec)
        blobs.append(blob)
        cols["bbox"].append(bb)
        cols["offset"].append(off)
        cols["nbytes"].append(len(blob))
        cols["crc32"].append(zlib.crc32(blob) & 0xFFFFFFFF)
        cols["voxels"].append(int(m.meta.get("voxels", m.voxels)))
        cols["score"].append(float(m.meta.get("score", 1.0)))
        cols["seed_axis"].append(int(m.meta.get("seed_axis", -1)))
        cols["seed_slice"].append(int(m.meta.get("seed_slice", -1)))
        cols["source"].append(str(m.meta.get("source", "")))
        off += len(blob)
    header = {
        "version": FORMAT_VERSION,
        "shape": shape,
        "backend": backend,
        "params": params,
        "codec": codec,
        "case_id": case_id,
        "num_masks": len(blobs),
        "payload_size": off,
        "masks": cols,
    }
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(_PRE.pack(MAGIC, FORMAT_VERSION, len(hb)))
            f.write(hb)
            for b in blobs:
                f.write(b)
            f.write(END_MAGIC)
            f.flush()


class MaskStore:
    """Read-only random access to the masks of one case. Use ``MaskStore.open(path)``."""

    def __init__(self, path: str, header: Dict[str, Any], payload_offset: int):
        self.path = path
        self.header = header
        self._payload_offset = payload_offset
        m = header["masks"]
        self._bbox = np.asarray(m["bbox"], dtype=np.int64).reshape(-1, 6)
        self._offset = np.asarray(m["offset"], dtype=np.int64)
        self._nbytes = np.asarray(m["nbytes"], dtype=np.int64)
        self._crc = [int(c) for c in m["crc32"]]
        self._fd: Optional[int] = None
        self._fd_pid: Optional[int] = None

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str) -> "MaskStore":
        fix = "Regenerate it: rerun nnssl_generate_masks for this dataset with --overwrite."
        if not os.path.isfile(path):
            raise UserInputError(f"{path}: mask store not found. Run nnssl_generate_masks for this dataset first.")
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                pre = f.read(_PRE.size)
                if len(pre) < _PRE.size:
                    raise ValueError("file too short")
                magic, version, hlen = _PRE.unpack(pre)
                if magic != MAGIC:
                    raise ValueError("not a nnssl mask store (bad magic)")
                if version != FORMAT_VERSION:
                    raise ValueError(f"unsupported format version {version} (this code reads {FORMAT_VERSION})")
                if hlen > size:
                    raise ValueError("header length exceeds file size")
                header = json.loads(f.read(hlen).decode("utf-8"))
                payload_offset = _PRE.size + hlen
                expected = payload_offset + int(header["payload_size"]) + len(END_MAGIC)
                if size != expected:
                    raise ValueError(f"file size {size} != expected {expected} (truncated or corrupt)")
                f.seek(size - len(END_MAGIC))
                if f.read(len(END_MAGIC)) != END_MAGIC:
                    raise ValueError("missing end marker (truncated)")
                n = int(header["num_masks"])
                for k in ("bbox", "offset", "nbytes", "crc32") + META_KEYS:
                    if len(header["masks"][k]) != n:
                        raise ValueError(f"header column {k!r} has wrong length")
                if len(header["shape"]) != 3:
                    raise ValueError("shape must be 3D")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error) as e:
            raise UserInputError(f"{path}: corrupt or truncated mask store ({e}). {fix}") from None
        return cls(path, header, payload_offset)

    # ---------------------------------------------------------------- properties
    def __len__(self) -> int:
        return int(self.header["num_masks"])

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(int(s) for s in self.header["shape"])

    @property
    def backend(self) -> str:
        return self.header["backend"]

    @property
    def params(self) -> Dict[str, Any]:
        return self.header["params"]

    @property
    def meta(self) -> Dict[str, Any]:
        """Store-level metadata: version, backend, params, shape, case_id, codec, num_masks."""
        return {k: v for k, v in self.header.items() if k != "masks"}

    def mask_meta(self, i: int) -> Dict[str, Any]:
        """Per-mask metadata: bbox, voxels, score, seed_axis, seed_slice, source."""
        i = self._check(i)
        m = self.header["masks"]
        d = {k: m[k][i] for k in META_KEYS}
        d["bbox"] = [int(b) for b in self._bbox[i]]
        return d

    @property
    def voxels(self) -> np.ndarray:
        return np.asarray(self.header["masks"]["voxels"], dtype=np.int64)

    @property
    def bboxes(self) -> np.ndarray:
        return self._bbox.copy()

    # ---------------------------------------------------------------- reading
    def _check(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"mask index {i} out of range for store with {n} masks")
        return i

    def _read(self, offset: int, n: int) -> bytes:
        pid = os.getpid()
        if self._fd is None or self._fd_pid != pid:  # reopen after fork (e.g. dataloader workers)
            self._fd = os.open(self.path, os.O_RDONLY)
            self._fd_pid = pid
        return os.pread(self._fd, n, offset)

    def crop(self, i: int) -> Tuple[Tuple[slice, slice, slice], np.ndarray]:
        """(bbox slices into the full grid, bool crop) of mask i. Reads only that mask's bytes."""
        i = self._check(i)
        blob = self._read(self._payload_offset + int(self._offset[i]), int(self._nbytes[i]))
        if len(blob) != self._nbytes[i] or (zlib.crc32(blob) & 0xFFFFFFFF) != self._crc[i]:
            raise UserInputError(
                f"{self.path}: mask {i} is corrupt (checksum mismatch). "
                "Regenerate it: rerun nnssl_generate_masks for this dataset with --overwrite.")
        bb = self._bbox[i]
        cshape = (int(bb[1] - bb[0]), int(bb[3] - bb[2]), int(bb[5] - bb[4]))
        bits = np.frombuffer(_decompress(blob, self.header["codec"]), dtype=np.uint8)
        arr = np.unpackbits(bits, count=int(np.prod(cshape))).reshape(cshape).astype(bool)
        return bbox_slices(bb), arr

    def mask(self, i: int) -> np.ndarray:
        """Mask i as a bool array in the full preprocessed grid (shape == image.shape[1:])."""
        sl, arr = self.crop(i)
        out = np.zeros(self.shape, dtype=bool)
        out[sl] = arr
        return out

    def verify(self) -> None:
        """Read every blob and check its checksum (raises UserInputError on corruption)."""
        for i in range(len(self)):
            self.crop(i)

    def close(self) -> None:
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self):  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_fd"] = None
        d["_fd_pid"] = None
        return d

    def __repr__(self) -> str:
        return f"MaskStore({self.path!r}, masks={len(self)}, shape={self.shape}, backend={self.backend!r})"

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def dense_bitpacked_bytes(self) -> int:
        """Bytes that the same masks would need as dense bit-packed full-grid volumes."""
        return len(self) * int(np.ceil(np.prod(self.shape) / 8))

    def file_bytes(self) -> int:
        return os.path.getsize(self.path)
