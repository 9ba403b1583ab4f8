"""Resumable results directories: one JSON line per condition, crash-safe appends, shard/rank merge.

Layout of a results directory ``DIR``::

    DIR/params.json                 run parameters + fingerprint, written first (atomically)
    DIR/results.jsonl               one record per condition (single-process runs, and after a merge)
    DIR/parts/results.part{i}-of-{n}.jsonl   one file per shard/rank of a sharded or torchrun run
    DIR/summary.json                run parameters, counts, timings (atomic: temp file + rename)
    DIR/images/*.png                generation | training-match pairs of flagged/extracted conditions
    DIR/report.html                 the self-contained report

Crash safety. A record is appended with a single ``os.write`` of the whole line (``O_APPEND``), then
``fsync``. A ``kill -9`` at any moment therefore leaves at most one torn final line (a write interrupted by
the kernel never interleaves with another record, and the next record is only written after the previous
``fsync`` returned). Readers drop a torn final line; a writer reopening the file truncates it first, so the
next record starts on a line boundary. Records are keyed by ``condition_id`` (the condition's index in the
run's condition list): resume skips every id present in any results file of the directory, and a merge keeps
the first record of each id, so no record is ever duplicated.

Parameters. ``params.json`` holds the parameters that decide the records (model, conditions, seeds, N,
thresholds, sampler, micro-batch size, ...). Re-opening a directory with different parameters is refused
with one line naming every differing parameter; parameters that do not change records (progress bars,
output paths, the number of shards) are simply not put into it by the caller. Two kinds of difference are
not held against a directory, which then resumes with the parameters it was started with: a parameter added
to the format later (``ADDED_PARAMS``, e.g. the model's weight digest) that the directory predates, and
where the model or training set was found (``LOCATION_PARAMS``: a path, or ``<tensor>``) when its content
digest is recorded and equal (a moved checkpoint, another node's mount point). Choices that cannot change
a record are compared as one (``canonical_params``): a default batch size asked for by its value, and the NN
extraction's options where it does not run.

Each part file has its run's parameters beside it (``parts/results.part{p}-of-{n}.params.json``; NN
checkpoints carry them inside), so a part gathered from another directory is checked where it lands: one
written by another run is refused by name (merge, resume, reading) before anything is merged. Parts written
before they carried parameters are taken as they are.

Sharding and multi-GPU / multi-node runs. Conditions are assigned round-robin: condition ``g`` belongs to
part ``g % n``. Part ``p`` of ``n`` writes ``parts/results.part{p}-of-{n}.jsonl``; since every record is
keyed by condition id, the parts are merged into ``results.jsonl`` without duplicates (``merge_parts``),
whatever the number of parts of earlier, interrupted attempts.

- Manual sharding: ``memcore extract ... --shard i/n --out DIR`` on n machines or processes (0 <= i < n),
  then ``memcore merge DIR`` once every shard has finished (copy the ``parts/`` and ``nn/`` files into one
  directory first when the machines do not share a filesystem).
- One node, several GPUs: ``torchrun --standalone --nproc-per-node=8 -m memcore extract ... --out DIR``.
  Each rank reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment, uses ``cuda:LOCAL_RANK``,
  takes part ``RANK`` of ``WORLD_SIZE`` and writes its own part file; the last rank to finish merges (every
  rank calls ``merge_parts`` when done; the merge is idempotent, atomic and takes a directory lock).
- Several nodes: the same command on every node with a shared filesystem for ``DIR``::

      torchrun --nnodes=M --nproc-per-node=8 --node-rank=K --rdzv-backend=c10d \\
               --rdzv-endpoint=HOST0:29500 -m memcore extract ... --out /shared/DIR

  torchrun sets the global ``RANK``/``WORLD_SIZE``; memcore needs no collective communication (ranks do
  not talk to each other), so the rendezvous only starts the processes. Without a shared filesystem run
  each node with ``--shard K/M`` (and torchrun inside the node: part = K * nproc + local rank), gather the
  ``parts/`` and ``nn/`` folders, and run ``memcore merge DIR``.
- ``--shard i/n`` combined with torchrun: part ``i * WORLD_SIZE + RANK`` of ``n * WORLD_SIZE``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import stat
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

try:  # POSIX advisory locks keep two writers off one part file; absent on Windows
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

PARAMS_FILE = "params.json"
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
PARTS_DIR = "parts"
_PART_RE = re.compile(r"^results\.part(\d+)-of-(\d+)\.jsonl$")
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------- sharding
@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """Part ``index`` of ``count``: this process handles conditions ``g`` with ``g % count == index``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.index, int) or not isinstance(self.count, int):
            raise TypeError("shard index and count must be integers")
        if self.count < 1:
            raise ValueError(f"shard count must be >= 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index must be in [0, {self.count}), got {self.index}")

    @property
    def is_whole(self) -> bool:
        return self.count == 1

    def owns(self, condition_id: int) -> bool:
        return condition_id % self.count == self.index

    def select(self, condition_ids: Iterable[int]) -> list[int]:
        return [g for g in condition_ids if self.owns(g)]

    def combine(self, inner: ShardSpec) -> ShardSpec:
        """Split this part further into ``inner.count`` parts (``--shard`` outside, torchrun ranks inside).

        Part ``index * inner.count + inner.index`` of ``count * inner.count``: over all (shard, rank) pairs
        these parts partition the condition ids, which is all that resume and merge need.
        """
        return ShardSpec(self.index * inner.count + inner.index, self.count * inner.count)

    @property
    def filename(self) -> str:
        return RESULTS_FILE if self.is_whole else f"results.part{self.index}-of-{self.count}.jsonl"


def parse_shard(text: str) -> ShardSpec:
    """``"i/n"`` -> ShardSpec(i, n); clear error otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
    return ShardSpec(int(m.group(1)), int(m.group(2)))


def shard_from_env(env: Mapping[str, str] | None = None) -> ShardSpec:
    """The torchrun rank as a ShardSpec (``RANK`` of ``WORLD_SIZE``); whole run when not under torchrun."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return ShardSpec()
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
    except ValueError as exc:
        raise ValueError(
            f"RANK/WORLD_SIZE must be integers, got {env.get('RANK')!r}/{env['WORLD_SIZE']!r}"
        ) from exc
    if world > 1 and "RANK" not in env:
        # each process would take itself for rank 0 and run part 0: the other parts never ran
        raise ValueError(
            f"WORLD_SIZE={world} but no RANK in the environment: start the ranks with torchrun, or unset "
            "WORLD_SIZE (use --shard i/n for manual parts)"
        )
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not a rank of WORLD_SIZE={world} (0 <= RANK < WORLD_SIZE)")
    return ShardSpec(rank, world)


def local_rank_from_env(env: Mapping[str, str] | None = None) -> int | None:
    env = os.environ if env is None else env
    v = env.get("LOCAL_RANK")
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"LOCAL_RANK must be an integer, got {v!r}") from None


# ------------------------------------------------------------------------------------------------ atomic files
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened/fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_out_dir(out: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse an output folder that cannot be one, before any work is done.

    Raises:
        ValueError: an empty path (it would write into the working directory), an existing file, a path under
            a file, or a place this user cannot write to (each named with ``flag``).
    """
    text = os.fspath(out)
    if not str(text).strip():
        raise ValueError(f"{flag} is empty; give a folder for the results")
    p = Path(out).absolute()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {text} exists and is not a directory")
    base = next(a for a in (p, *p.parents) if a.exists())
    if not base.is_dir():
        raise ValueError(f"{flag} {text}: {base} is a file, not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {text}: {base} is not writable by this user")


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it (done once, at import)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600: replaced into place as is, the summary and report of a run on a shared
        # filesystem were unreadable to the other users (and ranks) that results.jsonl is readable to. The
        # mode a plain open() would give: the file's current one, or 0666 less the umask.
        with contextlib.suppress(OSError):
            os.fchmod(fd, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n").encode())


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: tuples -> lists, numpy/torch scalars -> Python, non-finite floats -> None."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if hasattr(obj, "tolist") and getattr(obj, "ndim", 0) > 0:  # numpy / torch arrays
        return _jsonable(obj.tolist())
    if hasattr(obj, "item"):  # numpy / torch scalars
        return _jsonable(obj.item())
    if hasattr(obj, "tolist"):
        return _jsonable(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot store a {type(obj).__name__} in a results record")


def encode_record(record: Mapping[str, Any]) -> bytes:
    """One record as one compact JSON line (``\\n``-terminated, no embedded newlines)."""
    line = json.dumps(_jsonable(record), separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return (line + "\n").encode("utf-8")


# ----------------------------------------------------------------------------------------------- reading files
@dataclasses.dataclass(frozen=True)
class ReadResult:
    """Records of one JSONL file; ``valid_bytes`` is the length of its intact prefix (torn tail dropped)."""

    records: list[dict[str, Any]]
    valid_bytes: int
    torn_tail: bool


def read_records(path: str | os.PathLike) -> ReadResult:
    """Parse a results JSONL file, dropping a torn final line (the trace of a kill -9 during a write).

    A malformed line that is *not* the last one cannot come from memcore's writer: it is reported as
    corruption (ValueError naming the file and line) instead of being skipped silently.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ReadResult([], 0, False)
    records: list[dict[str, Any]] = []
    pos = 0
    lineno = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        lineno += 1
        if nl < 0:  # unterminated final line: torn write
            return ReadResult(records, pos, True)
        raw = data[pos:nl]
        try:
            rec = json.loads(raw.decode("utf-8"))
            if not isinstance(rec, dict) or "condition_id" not in rec:
                raise ValueError("not a condition record")
            cid = rec["condition_id"]
            if not isinstance(cid, int) or isinstance(cid, bool) or cid < 0:
                # read as it was, it failed later without naming the file (int(None)) or became another id
                raise ValueError(f"condition_id {cid!r} is not a condition's index")
        except (UnicodeDecodeError, ValueError) as exc:
            if nl + 1 >= len(data):  # a garbled last line is also a torn write
                return ReadResult(records, pos, True)
            raise ValueError(
                f"{path}: line {lineno} is not a valid results record ({exc}); "
                "the file was modified by something other than memcore"
            ) from exc
        records.append(rec)
        pos = nl + 1
    return ReadResult(records, pos, False)


# ---------------------------------------------------------------------------------------------------- writer
class RecordWriter:
    """Appends records to one JSONL file: one ``os.write`` per record, then ``fsync``.

    Holds an exclusive advisory lock on the file, so two processes configured with the same part cannot
    interleave records. Truncates a torn tail left by an earlier crash before the first append.
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        new = not self.path.exists()
        # 0o666 less the umask, as a plain open() gives (and the atomic writes of the summary and report)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        # the file's directory entry too: fsynced records in a file that a power cut unlinks are lost
        if new and fsync:
            _fsync_dir(self.path.parent)
        try:
            locked = _try_lock(self._fd)
        except OSError:
            os.close(self._fd)
            raise
        if not locked:
            os.close(self._fd)
            raise RuntimeError(
                f"{self.path} is being written by another memcore run (another process with the same "
                "--out and shard, or an iter_extract in this one not yet finished or closed); give each "
                "process its own --shard or torchrun rank"
            )
        info = read_records(self.path)
        if info.torn_tail:
            os.ftruncate(self._fd, info.valid_bytes)
            os.fsync(self._fd)
        self.existing = info.records

    def append(self, record: Mapping[str, Any]) -> None:
        line = encode_record(record)
        n = os.write(self._fd, line)
        if n != len(line):  # only on a full disk or similar; leave a torn tail that resume will drop
            raise OSError(f"short write to {self.path} ({n} of {len(line)} bytes)")
        if self._fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing releases the flock
            self._fd = -1

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()


# ----------------------------------------------------------------------------------------------- params file
def fingerprint(params: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``params`` (sorted keys)."""
    canon = json.dumps(_jsonable(params), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


# Run parameters added after the first results format: a directory started without one still resumes.
ADDED_PARAMS = ("model_sha256", "scheduler", "prompt_tokens_sha256", "train.sha256")
# Where a model or training set was found -> the key of its content digest: when both sides record the digest
# and it is equal, the location is not compared (a moved checkpoint, another node's mount point, a tensor
# holding a file's images give the same records).
LOCATION_PARAMS = {"model": "model_sha256", "train.source": "train.sha256"}
_ABSENT = object()
# the micro-batch an extraction runs at when none is asked for: min(N, this)
DEFAULT_MICRO_BATCH = 64
# options of the unconditional NN extraction (SPEC §3): they decide records only where it runs
_NN_PARAMS = ("nn_k", "nn_alpha", "nn_candidates")


def default_micro_batch(num_per_condition: int) -> int:
    """The micro-batch of a run given no batch size: at most ``DEFAULT_MICRO_BATCH``, at most N."""
    return min(num_per_condition, DEFAULT_MICRO_BATCH)


def canonical_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with the choices that cannot change a record put one way, for comparing two runs.

    A batch size or NN candidate count left to its default is the default's value (``--batch-size 64``
    with N >= 64 runs exactly as no ``--batch-size``); the NN extraction's options are dropped where it does
    not run (a class-conditional or text model, or no training set), as the run never reads them. Other keys
    are left as they are.
    """
    out = dict(params)
    n = out.get("num_per_condition")
    if isinstance(n, int):
        for key, default in (("batch_size", default_micro_batch(n)), ("nn_candidates", n)):
            if key in out and out[key] is None:
                out[key] = default
    if out.get("model_kind", "unet") != "unet" or out.get("train", _ABSENT) is None:
        for k in _NN_PARAMS:
            out.pop(k, None)
    return out


def _parent(d: Any, dotted: str) -> tuple[Any, str]:
    """(the object holding the dotted key's last part or None, that part)."""
    *parents, leaf = dotted.split(".")
    for k in parents:
        d = d.get(k) if isinstance(d, dict) else None
    return (d if isinstance(d, dict) else None), leaf


def _get(d: Any, dotted: str) -> Any:
    parent, leaf = _parent(d, dotted)
    return _ABSENT if parent is None else parent.get(leaf, _ABSENT)


def param_differences(
    directory: Mapping[str, Any],
    run: Mapping[str, Any],
    *,
    labels: tuple[str, str] = ("directory", "this run"),
    added: Sequence[str] = ADDED_PARAMS,
    located: Mapping[str, str] = LOCATION_PARAMS,
) -> list[str]:
    """What makes ``run`` another run than the one ``directory``'s parameters describe (empty: the same).

    A key of ``added`` that ``directory`` lacks is not compared; a key of ``located`` is not compared when its
    digest key is present and equal on both sides. One readable entry per remaining difference.
    """
    return _compare(directory, run, added, located, labels)[0]


def _compare(
    directory: Mapping[str, Any],
    run: Mapping[str, Any],
    added: Sequence[str],
    located: Mapping[str, str],
    labels: tuple[str, str] = ("directory", "this run"),
) -> tuple[list[str], list[str]]:
    """(the differences, what the allowances let pass: one readable note each)."""
    # fresh containers: popped from below
    a, b = (canonical_params(_jsonable(dict(p))) for p in (directory, run))
    notes, predated = [], []
    for dotted in added:
        if _get(a, dotted) is _ABSENT:
            parent, leaf = _parent(b, dotted)
            if parent is not None and leaf in parent:
                del parent[leaf]
                predated.append(dotted)
    if predated:
        notes.append(f"not checked, as the {labels[0]} predates them: {', '.join(predated)}")
    for where, digest in located.items():
        da = _get(a, digest)
        if da is not _ABSENT and da is not None and da == _get(b, digest):
            wa, wb = _get(a, where), _get(b, where)
            if wa != wb:
                notes.append(
                    f"{where}: {labels[1]} has {_short(wb)}, the {labels[0]} {_short(wa)} (same {digest})"
                )
            for d in (a, b):
                parent, leaf = _parent(d, where)
                if parent is not None:
                    parent.pop(leaf, None)
    return diff_params(a, b, labels=labels), notes


def _short(v: Any) -> str:
    """A value for a one-line message: strings (paths, digests) whole up to 300 characters, since their
    difference may be anywhere; other values (lists, objects) cut at 60."""
    s = json.dumps(v, sort_keys=True, ensure_ascii=False)
    limit = 300 if isinstance(v, str) else 60
    return s if len(s) <= limit else s[: limit - 3] + "..."


def diff_params(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    prefix: str = "",
    *,
    labels: tuple[str, str] = ("directory", "this run"),
) -> list[str]:
    """Human-readable differences, one entry per differing key (``train.sha256``: nested objects by key)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += diff_params(a, b, f"{prefix}{key}.", labels=labels)
        elif a != b:
            sa, sb = ("no value" if v is _ABSENT else _short(v) for v in (a, b))
            what = _DIGEST_MEANS.get(prefix + key)
            name = f"{prefix}{key} ({what})" if what else f"{prefix}{key}"
            out.append(f"{name}: {labels[0]} has {sa}, {labels[1]} has {sb}")
    return out


#: What a digest in the parameters stands for: two hex strings alone do not say what the user changed.
_DIGEST_MEANS = {
    "conditions_sha256": "the conditions, prompts or class ids in their order",
    "model_sha256": "the model's weights",
    "prompt_tokens_sha256": "the prompts' token ids",
    "train.sha256": "the training images",
}


# ---------------------------------------------------------------------------------------------- results dir
class ResultsDir:
    """A results directory for one run (see the module docstring for the layout and guarantees).

    Args:
        path: the directory (created if missing).
        params: the parameters that decide the records; JSON-serialisable.
        shard: which part of the run this process writes.
        resume: when False and the directory already holds records, refuse instead of resuming.
        added: dotted keys of ``params`` newer than some directories: when the directory's parameters lack
            one, it is not compared.
        located: dotted keys saying where something was found -> the key of its content digest: not compared
            when the digests are equal.

    A run the directory's parameters describe, differences aside that ``added`` and ``located`` allow, goes
    on with them (``self.params``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        params: Mapping[str, Any],
        *,
        shard: ShardSpec | None = None,
        resume: bool = True,
        added: Sequence[str] = ADDED_PARAMS,
        located: Mapping[str, str] = LOCATION_PARAMS,
    ) -> None:
        check_out_dir(path)
        self.path = Path(path)
        self.shard = shard or ShardSpec()
        self.params = _jsonable(dict(params))
        self.fingerprint = fingerprint(self.params)
        # what opening creates, so that a run failing before its first record can take it back (abandon)
        self._created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self._wrote_params = False
        self.path.mkdir(parents=True, exist_ok=True)
        self._check_or_write_params(added, located)
        done = self.completed_ids()  # checks the part files gathered here, too
        if done and not resume:
            raise ValueError(
                f"{self.path} already holds {len(done)} finished conditions; pass resume=True (the CLI "
                "resumes by default) or choose another --out"
            )
        self._writer: RecordWriter | None = None

    # params -------------------------------------------------------------------------------------------
    def _check_or_write_params(self, added: Sequence[str], located: Mapping[str, str]) -> None:
        pfile = self.path / PARAMS_FILE
        if pfile.exists():
            stored = _read_stored(pfile, "remove it or choose another --out")
            old, fmt = stored["params"], int(stored.get("format", 1))
            if fmt > FORMAT_VERSION:  # its records may mean what this version cannot read: do not append
                raise ValueError(
                    f"{self.path} was written by a newer memcore (results format {fmt}, this one reads up to "
                    f"{FORMAT_VERSION}); upgrade memcore or choose another --out"
                )
            if stored.get("fingerprint") != self.fingerprint:
                diffs, notes = _compare(old, self.params, added, located)
                if diffs:
                    raise ValueError(
                        f"{self.path} was started with different parameters; refusing to mix results. "
                        + "; ".join(diffs)
                        + ". Use another --out or the original parameters."
                    )
                # the same run described otherwise (keys it predates, the model found elsewhere): it goes on
                # as the directory describes it, and says what it let pass
                self.params, self.fingerprint = old, stored["fingerprint"]
                # once per node under torchrun (local rank 0): eight ranks saying the same line is noise
                if notes and not local_rank_from_env():
                    warnings.warn(f"resuming {self.path}: " + "; ".join(notes), stacklevel=3)
            return
        if any(self.path.glob("results*.jsonl")) or (self.path / PARTS_DIR).exists():
            if pfile.exists():  # a rank started beside this one wrote it and its first record meanwhile
                return self._check_or_write_params(added, located)
            raise ValueError(f"{self.path} holds results but no {PARAMS_FILE}; refusing to append to it")
        # files a run replaces at its end: without params.json they are not a memcore run's (it writes them
        # last), and another tool's summary or report would be lost
        theirs = [n for n in (SUMMARY_FILE, "report.html", "nn_extraction.json") if (self.path / n).exists()]
        if theirs:
            raise ValueError(
                f"{self.path} holds {', '.join(theirs)} but no {PARAMS_FILE}: not a memcore results directory, "
                "and a run would replace them; choose another --out"
            )
        atomic_write_json(pfile, self._stored())
        self._wrote_params = True

    def abandon(self) -> None:
        """Take back what opening wrote, when the run failed before writing anything else.

        A run refused after the directory was opened (out of memory for the requested N, a model the sampler
        cannot run, an interrupt) would otherwise leave a params.json that then refuses the corrected
        command as "started with different parameters". Only a directory holding nothing but the params.json
        this process wrote is cleared (then the directories opening created, if empty); anything another
        rank or an earlier run put there stays.

        A rank that opened the directory beside this one and writes its first file meanwhile keeps the
        params.json: this process looks again after taking it back and restores it when anything appeared,
        and the other rank looks for it after its first file exists (``keep_params``). Whichever of the two
        looks last sees the other's doing, so the directory never ends with records but no params.json.
        """
        self.close()
        if not self._wrote_params:
            return
        with contextlib.suppress(OSError):
            if {p.name for p in self.path.iterdir()} != {PARAMS_FILE}:
                return
            (self.path / PARAMS_FILE).unlink()
            self._wrote_params = False
            for d in self._created:  # deepest first; a directory someone else wrote into stays
                d.rmdir()
        with contextlib.suppress(OSError):
            if self.path.is_dir() and any(self.path.iterdir()):
                self.keep_params()

    def _stored(self) -> dict[str, Any]:
        """What params.json (and a part's copy of it) holds."""
        return {"format": FORMAT_VERSION, "fingerprint": self.fingerprint, "params": self.params}

    def keep_params(self) -> None:
        """Write params.json again if it is gone: a rank beside this one took it back (``abandon``) while
        this one began writing. Called once this process's first file in the directory exists."""
        pfile = self.path / PARAMS_FILE
        if not pfile.exists():
            atomic_write_json(pfile, self._stored())

    def _write_part_params(self) -> None:
        """A part file's own copy of the parameters: gathered into another directory, it is checked there."""
        side = part_params_path(self.part_path)
        # also over a copy left beside no records: one that came with another run's part, moved out as the
        # refusal asks, would otherwise describe this run's records and refuse them at the next reading
        if not self.shard.is_whole and (not side.exists() or _is_empty(self.part_path)):
            side.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(side, self._stored())

    # files --------------------------------------------------------------------------------------------
    @property
    def results_path(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def part_path(self) -> Path:
        return self.results_path if self.shard.is_whole else self.path / PARTS_DIR / self.shard.filename

    def result_files(self) -> list[Path]:
        return _result_files(self.path)

    def iter_records(self) -> Iterator[dict[str, Any]]:
        """Every intact record of every results file, the first per condition id only."""
        seen: set[int] = set()
        for f in self.result_files():
            for rec in read_records(f).records:
                cid = int(rec["condition_id"])
                if cid not in seen:
                    seen.add(cid)
                    yield rec

    def completed_ids(self) -> set[int]:
        return {int(r["condition_id"]) for r in self.iter_records()}

    # writing ------------------------------------------------------------------------------------------
    def writer(self) -> RecordWriter:
        if self._writer is None:
            # with the first record, not at open: parts/ appears no earlier than it did (a rank starting beside
            # this one tells a directory without params.json by it), and a run that writes nothing leaves nothing
            self._write_part_params()
            if self.shard.is_whole:  # results.jsonl, which a merge replaces: see merge_parts
                with _dir_lock(self.path):
                    self._writer = RecordWriter(self.part_path)
            else:
                self._writer = RecordWriter(self.part_path)
            self.keep_params()
        return self._writer

    def append(self, record: Mapping[str, Any]) -> None:
        if "condition_id" not in record:
            raise ValueError("a results record needs a 'condition_id'")
        self.writer().append(record)

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        path = self.path / SUMMARY_FILE
        atomic_write_json(path, summary)
        return path

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> ResultsDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def merge(self) -> list[dict[str, Any]]:
        return merge_parts(self.path)


@contextlib.contextmanager
def _dir_lock(path: Path, name: str = ".merge.lock") -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(path / name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def summary_lock(path: str | os.PathLike) -> contextlib.AbstractContextManager[None]:
    """Held by a process from its merge of the parts until its ``summary.json`` and report are written.

    Ranks finishing together then write in turn, each from a merge made after the previous one wrote: the
    summary and report left are those of the last merge, which has every record. Without it, a rank that
    merged first but wrote last replaced the complete summary with its older one. (Its own lock file:
    :func:`merge_parts` takes the merge lock inside it.)
    """
    return _dir_lock(Path(path), ".summary.lock")


def merge_parts(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Merge ``results.jsonl`` and every ``parts/*.jsonl`` into ``results.jsonl`` (sorted by condition id,
    first record per id kept), atomically. Part files are left in place (a merge is idempotent), so a rank
    still writing is never disturbed; its later records are picked up by the next merge. A ``results.jsonl``
    that a single-process run is still appending to is left as it is, with a warning: replaced, the records
    that run appends next would go to the unlinked file.

    Returns the merged records.
    """
    path = Path(path)
    if not (path / PARAMS_FILE).exists():
        raise ValueError(f"{path} is not a memcore results directory (no {PARAMS_FILE})")
    with _dir_lock(path), _unwritten(path / RESULTS_FILE) as free:
        seen = _collect(path)
        merged = [seen[k] for k in sorted(seen)]
        if free:
            atomic_write_bytes(path / RESULTS_FILE, b"".join(encode_record(r) for r in merged))
        else:  # replaced, the file would go on growing unlinked: the records appended from now on were lost
            warnings.warn(
                f"{path / RESULTS_FILE} is being written by a running memcore extract; it was left as it is "
                "(the summary counts every record): run memcore merge again when that run has finished",
                stacklevel=2,
            )
    return merged


@contextlib.contextmanager
def _unwritten(path: Path) -> Iterator[bool]:
    """Hold ``path``'s writer lock, yielding True, or yield False if a :class:`RecordWriter` holds it.

    A whole run's writer opens ``results.jsonl`` under the directory lock (``ResultsDir.writer``), so with
    that lock held, a free file stays free until this returns.
    """
    if fcntl is None:  # pragma: no cover
        yield True
        return
    fd = -1
    # writable where it may be: NFS emulates flock with fcntl locks, and exclusive ones need it
    for mode in (os.O_RDWR, os.O_RDONLY):
        with contextlib.suppress(PermissionError, FileNotFoundError):
            fd = os.open(path, mode)
            break
    if fd < 0:  # no file (no writer either), or one this user may not open (nor lock): replaced as before
        yield True
        return
    try:
        try:
            free = _try_lock(fd)
        except OSError as exc:
            if exc.errno != errno.EBADF:  # a read-only descriptor on NFS: cannot tell
                raise
            free = True
        yield free
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    """Take ``fd``'s exclusive advisory lock without waiting: False when another open file holds it (a
    :class:`RecordWriter`), True when taken or where there is no ``fcntl``; other errors raise."""
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return True


def load_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a results directory (every file, deduplicated by condition id, sorted by id)."""
    seen = _collect(Path(path))
    return [seen[k] for k in sorted(seen)]


def part_params_path(part: Path) -> Path:
    """``parts/results.part0-of-2.jsonl`` -> ``parts/results.part0-of-2.params.json``."""
    return part.with_name(part.name.removesuffix(".jsonl") + ".params.json")


def dir_params(path: Path) -> dict[str, Any] | None:
    """The parameters of the results directory ``path``; None when it has no ``params.json`` (yet)."""
    return load_params(path) if (path / PARAMS_FILE).exists() else None


def check_foreign(
    directory: Mapping[str, Any] | None, path: Path, what: Path, theirs: Mapping[str, Any] | None
) -> None:
    """Refuse ``what`` (a part file found in the results directory ``path``, whose parameters are
    ``directory``) if the run that wrote it, with parameters ``theirs``, is another run; None on either side
    (no ``params.json``, or a part written before parts carried parameters) passes."""
    if theirs is None or directory is None:
        return
    diffs = param_differences(directory, theirs, labels=("the directory", "the part"))
    if diffs:
        raise ValueError(
            f"{what} was written by another run than {path} describes: "
            + "; ".join(diffs)
            + ". Move it out of the directory (or run that part again here)."
        )


def _result_files(path: Path) -> list[Path]:
    """``results.jsonl`` and the part files, each part checked against the directory's parameters."""
    files = [path / RESULTS_FILE] if (path / RESULTS_FILE).exists() else []
    if (path / PARTS_DIR).is_dir():
        directory = dir_params(path)  # read once for all the parts
        for p in sorted(p for p in (path / PARTS_DIR).iterdir() if _PART_RE.match(p.name)):
            side = part_params_path(p)
            if side.exists():
                theirs = _read_stored(side, f"restore it, or delete it to take {p.name} unchecked")["params"]
                check_foreign(directory, path, p, theirs)
            files.append(p)
    return files


def _collect(path: Path) -> dict[int, dict[str, Any]]:
    seen: dict[int, dict[str, Any]] = {}
    for f in _result_files(path):
        for rec in read_records(f).records:
            seen.setdefault(int(rec["condition_id"]), rec)
    return seen


def read_json_file(path: str | os.PathLike, advice: str = "restore it or remove it") -> Any:
    """A results directory's JSON file, or a ValueError naming it (a bare decoding error named no file) and
    saying what to do (``advice``)."""
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is corrupt ({exc}); {advice}") from None


def adopt_part_params(path: str | os.PathLike) -> bool:
    """Write ``params.json`` from the parts' own copies when ``path`` has parts but no ``params.json``.

    That is a multi-node run's parts gathered into a new folder (README, Scale): every part carries the
    parameters of the run that wrote it, so the directory's can be taken from them. They must describe one
    run; parts of several are refused by name. Returns whether ``params.json`` was written.
    """
    path = Path(path)
    if (path / PARAMS_FILE).exists() or not (path / PARTS_DIR).is_dir():
        return False
    parts = sorted(f for f in (path / PARTS_DIR).iterdir() if _PART_RE.match(f.name))
    sides = [side for side in map(part_params_path, parts) if side.exists()]
    if not sides:
        return False
    first = _read_stored(sides[0])
    for side in sides[1:]:
        diffs = param_differences(
            first["params"], _read_stored(side)["params"], labels=(sides[0].name, side.name)
        )
        if diffs:
            raise ValueError(
                f"{path} has no {PARAMS_FILE} and its parts were written by different runs: {'; '.join(diffs)}"
            )
    atomic_write_json(path / PARAMS_FILE, first)
    return True


def load_params(path: str | os.PathLike) -> dict[str, Any]:
    pfile = Path(path) / PARAMS_FILE
    if not pfile.exists():
        raise ValueError(f"{path} is not a memcore results directory (no {PARAMS_FILE})")
    return _read_stored(pfile)["params"]


def _read_stored(pfile: Path, advice: str = "restore it or remove it") -> dict[str, Any]:
    """A parameters file (``{"format", "fingerprint", "params"}``: params.json or a part's sidecar), or a
    ValueError naming it and saying what to do (``advice``)."""
    stored = read_json_file(pfile, advice)
    try:
        if not isinstance(stored, dict) or not isinstance(stored.get("params"), dict):
            raise TypeError("no params object")
        int(stored.get("format", 1))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{pfile} is corrupt ({exc}); {advice}") from None
    return stored
