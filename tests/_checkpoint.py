"""Reading and rewriting a safetensors checkpoint's JSON header, to build corrupted files."""

import json
import struct


def header(path):
    """(header length, header dict) of a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


def rewrite_header(path, new_header):
    """Replace the file's header, keeping its tensor bytes."""
    n, _ = header(path)
    with open(path, "rb") as f:
        data = f.read()[8 + n:]
    raw = json.dumps(new_header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def edit_meta(path, fn):
    """Apply fn to the bitfuse metadata (a dict) stored in the file's header."""
    _, h = header(path)
    meta = json.loads(h["__metadata__"]["bitfuse"])
    fn(meta)
    h["__metadata__"]["bitfuse"] = json.dumps(meta)
    rewrite_header(path, h)
