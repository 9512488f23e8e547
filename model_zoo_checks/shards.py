"""A zoo sweep split into shards (``--shard I/N``, or one shard per process under torchrun) and the
merge of any set of shard files into one report (``--report-only``).

Shard I of N checks every N-th model of the selection from the I-th on (0 <= I < N, the torchrun
rank and world size when run under torchrun).  It writes ``shard-I-of-N.jsonl`` in the shard folder:
a header line (the whole selection, I, N, the code fingerprint), then one record per model as it
finishes (models already in the cache with the current fingerprint first), then a closing line
``{"complete": true}``.  The files are self-contained: shards run on different machines are merged
by copying their files into one folder and running ``--report-only --shard-dir FOLDER``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from srd_fx.errors import DistributedError, ResumeError

_NAME = re.compile(r"shard-(\d+)-of-(\d+)\.jsonl$")


def parse_shard(text: str) -> Tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N (an argparse ``type``)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"--shard expects I/N with 0 <= I < N (e.g. 0/4 ... 3/4), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def shard_from_env() -> Optional[Tuple[int, int]]:
    """(RANK, WORLD_SIZE) under torchrun with more than one process, else None."""
    from srd_fx.eval.distributed import launched_distributed
    if not launched_distributed():
        return None
    try:
        i, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        raise DistributedError("WORLD_SIZE is set but RANK is not an integer: launch with torchrun, or "
                               "give the shard explicitly with --shard I/N") from None
    return parse_shard(f"{i}/{n}")


def shard_names(names: Sequence[str], i: int, n: int) -> List[str]:
    return list(names[i::n])


def shard_path(folder: Path, i: int, n: int) -> Path:
    return Path(folder) / f"shard-{i}-of-{n}.jsonl"


def _json_default(o):
    return str(o)


def _read(path: Path) -> Tuple[Optional[dict], Dict[str, dict], bool]:
    """(header, model -> record, complete) of one shard file; lines cut by a kill are ignored."""
    header, recs, complete = None, {}, False
    with open(path) as f:
        for k, line in enumerate(f):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if k == 0 and isinstance(obj, dict) and "shard" in obj:
                header = obj
            elif isinstance(obj, dict) and obj.get("complete") is True:
                complete = True
            elif isinstance(obj, dict) and "model" in obj:
                recs[obj["model"]] = obj
    return header, recs, complete


def shard_files(folder: Path) -> Dict[Tuple[int, int], Path]:
    folder = Path(folder)
    out = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            m = _NAME.fullmatch(p.name)
            if m:
                out[(int(m.group(1)), int(m.group(2)))] = p
    return out


class ShardWriter:
    """Writes one shard file: :meth:`start` (header and the records already known), :meth:`add`
    (one record, as it finishes), :meth:`finish` (the closing line)."""

    def __init__(self, folder: Path, i: int, n: int, names: Sequence[str], fingerprint: str, options: dict):
        self.folder, self.i, self.n = Path(folder), i, n
        self.path = shard_path(self.folder, i, n)
        self.header = dict(shard=i, of=n, names=list(names), fingerprint=fingerprint, options=options)

    def check(self) -> None:
        """Refuse (:class:`srd_fx.ResumeError`, nothing written) when the folder holds shards of the same
        selection split another way: the sweep's number of shards changed between run and resume."""
        for (i, n), p in shard_files(self.folder).items():
            if n == self.n:
                continue
            header, _, _ = _read(p)
            if header and header.get("names") == self.header["names"]:
                raise ResumeError(
                    f"{self.folder} holds shards of this selection split in {n} ({p.name}); this run splits it in "
                    f"{self.n}. Resume with --shard I/{n} (torchrun with {n} processes in all), or use another "
                    "--shard-dir (or delete the old shard files) to split it anew. Nothing was overwritten.")

    def earlier(self) -> Dict[str, dict]:
        """The records this shard's file already holds (from an interrupted run of the same shard)."""
        if not self.path.exists():
            return {}
        header, recs, _ = _read(self.path)
        if not header or header.get("names") != self.header["names"]:
            return {}
        return recs

    def start(self, records: Sequence[dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(json.dumps(self.header) + "\n")
            for r in records:
                f.write(json.dumps(r, default=_json_default) + "\n")
        os.replace(tmp, self.path)

    def _append(self, obj: dict) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, (json.dumps(obj, default=_json_default) + "\n").encode())
        finally:
            os.close(fd)

    def add(self, rec: dict) -> None:
        self._append(rec)

    def finish(self) -> None:
        self._append({"complete": True})


def merge(folder: Path) -> Tuple[List[str], Dict[str, dict], dict]:
    """The selection, the records and a summary ``{"of": N, "merged": [I...], "incomplete": [I...],
    "missing": [I...], "folder": ...}`` of the shard files in ``folder``.  Raises
    :class:`srd_fx.DistributedError` for files of different sweeps or splits."""
    files = shard_files(folder)
    if not files:
        raise DistributedError(f"no shard files (shard-I-of-N.jsonl) in {folder}")
    splits = sorted({n for _, n in files})
    if len(splits) > 1:
        raise DistributedError(
            f"{folder} holds shard files of {len(splits)} different splits (of {', '.join(map(str, splits))}); "
            "a sweep's shards must all be split the same way: keep one set (move the others elsewhere)")
    n = splits[0]
    names, records, merged, incomplete = None, {}, [], []
    for (i, _), p in sorted(files.items()):
        header, recs, complete = _read(p)
        if header is None:
            incomplete.append(i)
            continue
        if names is None:
            names = header["names"]
        elif header["names"] != names:
            raise DistributedError(f"{p.name} belongs to another selection of models than the other shard files "
                                   f"in {folder}; merge only the shards of one sweep")
        records.update(recs)
        (merged if complete else incomplete).append(i)
    missing = [i for i in range(n) if (i, n) not in files]
    return list(names or []), records, dict(of=n, merged=merged, incomplete=incomplete, missing=missing,
                                            folder=str(folder))


def summary_line(info: dict) -> str:
    """One sentence for REPORT.md: which shards were merged, which are missing or unfinished."""
    n = info["of"]
    s = (f"Merged from {len(info['merged'])} of {n} shards ({', '.join(f'{i}/{n}' for i in info['merged']) or 'none'})")
    if info["incomplete"]:
        s += f"; unfinished (their finished models are included): {', '.join(f'{i}/{n}' for i in info['incomplete'])}"
    if info["missing"]:
        s += (f"; **missing: {', '.join(f'{i}/{n}' for i in info['missing'])}** (their models are listed under "
              "\"Not run\"; run them with --shard I/N and copy their files here)")
    return s + "."
