"""Read an offline W&B run back (wandb 0.31 has no public offline reader).

A `.wandb` file is a 7-byte `:W&B` header followed by leveldb-log framing: 32 KiB blocks of records, each with a
7-byte header (CRC32, little-endian length, type FULL/FIRST/MIDDLE/LAST) around serialized
`wandb_internal_pb2.Record` messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding at a block's end
            pos += room
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        record = pb.Record()
        record.ParseFromString(pending)
        pending = b""
        yield record


def read_run(run_dir: Path) -> dict:
    """Config, summary, run info (name, group, job_type, tags) and exit code of an offline run folder."""
    file = next(Path(run_dir).glob("run-*.wandb"))
    out = {"config": {}, "summary": {}, "run": {}, "exit_code": None, "history_keys": set()}
    for r in records(file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = {"name": r.run.display_name, "group": r.run.run_group, "job_type": r.run.job_type,
                          "tags": list(r.run.tags), "id": r.run.run_id}
            for item in r.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in r.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in r.summary.update:
                key = item.key or "/".join(item.nested_key)
                out["summary"][key] = json.loads(item.value_json)
        elif kind == "history":
            for item in r.history.item:
                out["history_keys"].add(item.key or "/".join(item.nested_key))
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
    return out


def offline_runs(folder: Path) -> list[Path]:
    return sorted(Path(folder).rglob("offline-run-*"))
