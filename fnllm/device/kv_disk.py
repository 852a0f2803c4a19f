"""The disk KV tier: a persistent, content-addressed prefix cache.

A full prompt block is stored as one file named by its chained SHA-256 hash
(the core's prefix-cache name), in a directory named by a fingerprint of the
model (weights identity, dtype, block size, KV layout), so a second process
serving the same model finds the blocks a first one wrote, and a process
serving another model never looks at them.

File layout: ``MAGIC | fingerprint (32) | block hash (32) | payload length (8)
| SHA-256 of payload (32) | payload``, payload the block's K and V for every
layer, ``(num_layers, 2, block_size, num_kv_heads, head_size)`` in the
model's dtype. A file whose header, length or checksum does not match is
never served: it is removed, and the block is recomputed. Files are written
by a background thread (write to a temporary name, then an atomic rename);
the directory is bounded by ``max_bytes``, least recently used files (by
modification time; a read touches the file) deleted first.

The engine reaches it through :class:`fnllm.offload.KVOffload`.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import queue
import threading
from collections import OrderedDict

import torch


MAGIC = b"FNKVBLK1"
HEADER = len(MAGIC) + 32 + 32 + 8 + 32
SUFFIX = ".kv"


def _sample_digest(path: str, h) -> None:
    """Name, size and the first and last MiB of a weight file."""
    size = os.path.getsize(path)
    h.update(f"{os.path.basename(path)}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))


def model_fingerprint(executor) -> bytes:
    """SHA-256 over the weights' identity, dtype, block size and KV layout."""
    h = hashlib.sha256(b"fnllm kv layout (layers, 2, block, kv_heads, head) v1")
    root = executor.gguf_path or executor.model_path
    if os.path.isdir(root):
        files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith((".safetensors", ".json", ".gguf")))
    else:
        files = [str(root)]
    for f in files:
        _sample_digest(f, h)
    cfg = executor.config
    h.update(repr((str(executor.dtype), executor.block_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)).encode())
    return h.digest()


class DiskKV:
    """Block files under ``root/<fingerprint>``: read (verified), write (background), LRU-bounded."""

    def __init__(self, root: str, fingerprint: bytes, max_bytes: int, shape: tuple, dtype: torch.dtype) -> None:
        if max_bytes <= 0:
            raise ValueError(f"kv_offload_bytes must be > 0, got {max_bytes}")
        self.fingerprint, self.max_bytes, self.shape, self.dtype = fingerprint, max_bytes, shape, dtype
        self.payload_bytes = torch.empty(shape, dtype=dtype).numel() * torch.empty((), dtype=dtype).element_size()
        self.dir = os.path.join(root, fingerprint.hex()[:40])
        os.makedirs(self.dir, exist_ok=True)
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # hash hex -> file size, least recent first
        self._pending: set[str] = set()
        self.rejected = 0  # files found bad and removed
        self._scan()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._writer, name="fnllm-kv-disk-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _scan(self) -> None:
        entries = []
        for name in os.listdir(self.dir):
            path = os.path.join(self.dir, name)
            if name.endswith(SUFFIX):
                entries.append((os.path.getmtime(path), name[: -len(SUFFIX)], os.path.getsize(path)))
            elif name.endswith(".tmp"):
                os.unlink(path)  # a write cut short by a crash
        for _, key, size in sorted(entries):
            self._index[key] = size

    def _path(self, key: str) -> str:
        return os.path.join(self.dir, key + SUFFIX)

    def __contains__(self, block_hash: bytes) -> bool:
        key = block_hash.hex()
        with self._lock:
            return key in self._index or key in self._pending

    @property
    def num_bytes(self) -> int:
        with self._lock:
            return sum(self._index.values())

    # -- reading --------------------------------------------------------------------------
    def read(self, block_hash: bytes) -> torch.Tensor | None:
        """The block's KV, or None (absent, or bad: then the file is removed)."""
        key = block_hash.hex()
        with self._lock:
            if key not in self._index:
                return None
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            self._drop(key)
            return None
        payload = self._verify(data, block_hash)
        if payload is None:
            self.rejected += 1
            self._drop(key)
            return None
        try:
            os.utime(path)
        except OSError:
            pass
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
        return torch.frombuffer(bytearray(payload), dtype=self.dtype).reshape(self.shape)

    def _verify(self, data: bytes, block_hash: bytes) -> bytes | None:
        if len(data) != HEADER + self.payload_bytes or not data.startswith(MAGIC):
            return None
        p = len(MAGIC)
        fp, bh, n, digest = data[p : p + 32], data[p + 32 : p + 64], data[p + 64 : p + 72], data[p + 72 : HEADER]
        payload = data[HEADER:]
        if fp != self.fingerprint or bh != block_hash or int.from_bytes(n, "little") != self.payload_bytes:
            return None
        return payload if hashlib.sha256(payload).digest() == digest else None

    def _drop(self, key: str) -> None:
        with self._lock:
            self._index.pop(key, None)
        try:
            os.unlink(self._path(key))
        except OSError:
            pass

    # -- writing (background) ----------------------------------------------------------------
    def submit(self, block_hash: bytes, kv: torch.Tensor) -> None:
        """Queue a block for writing (a copy the caller no longer touches)."""
        key = block_hash.hex()
        with self._lock:
            if key in self._index or key in self._pending:
                return
            self._pending.add(key)
        self._queue.put((block_hash, kv))

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            finally:
                self._queue.task_done()

    def _write(self, block_hash: bytes, kv: torch.Tensor) -> None:
        key = block_hash.hex()
        payload = kv.contiguous().view(torch.uint8).numpy().tobytes()
        data = MAGIC + self.fingerprint + block_hash + len(payload).to_bytes(8, "little")
        data += hashlib.sha256(payload).digest() + payload
        tmp = self._path(key) + f".{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self._path(key))
        except OSError:
            with self._lock:
                self._pending.discard(key)
            return
        with self._lock:
            self._pending.discard(key)
            self._index[key] = len(data)
            self._index.move_to_end(key)
            excess = sum(self._index.values()) - self.max_bytes
            victims = []
            for k in list(self._index):
                if excess <= 0:
                    break
                excess -= self._index.pop(k)
                victims.append(k)
        for k in victims:
            try:
                os.unlink(self._path(k))
            except OSError:
                pass

    def flush(self) -> None:
        """Wait until every queued block is on disk."""
        self._queue.join()

    def close(self) -> None:
        if self._thread.is_alive():
            self.flush()
            self._queue.put(None)
            self._thread.join()
