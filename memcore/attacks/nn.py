"""Unconditional nearest-neighbour extraction (SPEC §3): the O(train) state, its checkpoints and its merge.

The NN candidates of a run are the indices ``i`` in ``[0, nn_candidates)`` with seeds ``seed + i``; the first
``num_per_condition`` of them are also condition 0's generate-and-filter candidates. Per training image the
state keeps the best ratio, the seed of the candidate that reached it (ties: the smaller seed) and that
candidate's distance. Folding a candidate in is an elementwise minimum with a deterministic tie rule, so the
state does not depend on the order, the batching or the process in which candidates were folded: parts of
the candidate range can be run by different shards/ranks, or in several sittings, and merged exactly.

Persistence. Each process owns one part file ``nn/state.part<i>-of-<n>.safetensors`` in the results
directory: the three state arrays plus, in the safetensors metadata, the index intervals already folded in.
It is rewritten atomically (temp file, fsync, rename) every ``checkpoint_s`` seconds and at the end, so a
``kill -9`` loses at most the candidates since the last checkpoint, never corrupts a file, and a rerun folds
in only the intervals no part covers yet (whatever the shard count was before). When the parts together cover
the whole range, they are merged into ``nn_extraction.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from memcore.io import results as _results

NN_DIR = "nn"
_PART_RE = re.compile(r"^state\.part(\d+)-of-(\d+)\.safetensors$")
_BIG = torch.iinfo(torch.int64).max

Interval = tuple[int, int]  # [lo, hi)


# ------------------------------------------------------------------------------------------------ intervals
def normalize(iv: Iterable[Sequence[int]]) -> list[Interval]:
    """Sorted, disjoint, non-empty, merged intervals."""
    out: list[Interval] = []
    for lo, hi in sorted((int(a), int(b)) for a, b in iv if int(b) > int(a)):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def subtract(a: Iterable[Sequence[int]], b: Iterable[Sequence[int]]) -> list[Interval]:
    """``a`` minus ``b`` (both normalized on the way in)."""
    out: list[Interval] = []
    bs = normalize(b)
    for lo, hi in normalize(a):
        cur = lo
        for blo, bhi in bs:
            if bhi <= cur or blo >= hi:
                continue
            if blo > cur:
                out.append((cur, blo))
            cur = max(cur, bhi)
            if cur >= hi:
                break
        if cur < hi:
            out.append((cur, hi))
    return out


def length(iv: Iterable[Sequence[int]]) -> int:
    return sum(hi - lo for lo, hi in normalize(iv))


def assignment(num_candidates: int, num_per_condition: int, shard: _results.ShardSpec) -> list[Interval]:
    """The NN candidate indices a shard runs: ``[0, N)`` goes with condition 0 (its owner generates them
    anyway), the rest is split into ``shard.count`` contiguous ranges."""
    n0 = min(num_candidates, num_per_condition)
    out: list[Interval] = [(0, n0)] if shard.owns(0) else []
    extra = num_candidates - n0
    lo = n0 + extra * shard.index // shard.count
    hi = n0 + extra * (shard.index + 1) // shard.count
    return normalize([*out, (lo, hi)])


# ---------------------------------------------------------------------------------------------------- result
@dataclasses.dataclass(frozen=True)
class NNExtraction:
    """Unconditional nearest-neighbour extraction (SPEC §3).

    Attributes:
        extracted_train_indices: unique training images extracted (ratio <= 1), ascending.
        seeds: the seed of the best candidate for each of them.
        ratios / distances: that candidate's ratio and normalized L2 to the training image.
        num_candidates, num_train, k, alpha: what was run.
        images: PNG pair paths relative to the results directory (None where not written).
    """

    extracted_train_indices: tuple[int, ...]
    seeds: tuple[int, ...]
    ratios: tuple[float, ...]
    distances: tuple[float, ...]
    num_candidates: int
    num_train: int
    k: int
    alpha: float
    images: tuple[str | None, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["extracted"] = [
            {"train_index": i, "seed": s, "ratio": r, "distance": dd, "image": im}
            for i, s, r, dd, im in zip(
                self.extracted_train_indices,
                self.seeds,
                self.ratios,
                self.distances,
                self.images or (None,) * len(self.seeds),
            )
        ]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NNExtraction:
        d = {k: v for k, v in d.items() if k != "extracted"}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def image_name(train_index: int, seed: int) -> str:
    """Path of an NN extraction's PNG pair, relative to the results directory."""
    return f"images/nn_train{train_index:06d}_seed{seed}.png"


# ----------------------------------------------------------------------------------------------------- state
def _ratio(dists: torch.Tensor, alpha: float) -> torch.Tensor:
    """[B] float32 ratios of SPEC §3 from [B, k] ascending distances (see :meth:`NNState.update`).

    The mean over S is a float64 sum, exact for k float32 distances in [0, 1] whose smallest nonzero one is
    above ``2^-(29 - log2(k))``: distances between uint8 images are (the smallest nonzero one is at least
    ``1 / (255 · sqrt(C·H·W))``) for k <= 500 and images up to 3 × 1024 × 1024. So the ratio does not depend
    on the summation order that a float32 ``mean`` takes from the memory layout, the batch or the device (a
    CPU and a GPU run agree); it is rounded to float32 once, at the end.
    """
    d = dists.to(torch.float64)
    ratio = (d[:, 0] / (alpha * (d.sum(1) / d.shape[1]))).to(torch.float32)
    ratio = torch.where(dists[:, 0] == 0, 0.0, ratio)  # an exact copy of x (0/0 when all of S are copies)
    return torch.where(torch.isfinite(dists).all(1), ratio, math.inf)


class NNState:
    """Per training image: best ratio [T] float32, its seed [T] int64, its distance [T] float32.

    ``done`` lists the candidate index intervals folded in. Device-resident while running; no method but
    :meth:`save` and :meth:`result` waits for the device.
    """

    def __init__(self, num_train: int, device: torch.device | str = "cpu") -> None:
        self.ratio = torch.full((num_train,), math.inf, dtype=torch.float32, device=device)
        self.seed = torch.full((num_train,), _BIG, dtype=torch.int64, device=device)
        self.dist = torch.full((num_train,), math.inf, dtype=torch.float32, device=device)
        self.done: list[Interval] = []

    @property
    def num_train(self) -> int:
        return self.ratio.shape[0]

    @property
    def count(self) -> int:
        return length(self.done)

    def update(self, dists: torch.Tensor, idx: torch.Tensor, seeds: torch.Tensor, alpha: float) -> None:
        """Fold in candidates from their k-NN against the training set.

        A candidate's nearest image x is ``idx[:, 0]`` (the smallest index among equally near ones) and its
        ratio ``d_1 / (alpha · mean(d_1..d_k))``: the set S of SPEC §3 is the k nearest images, x included
        (k is the training set's size when that is smaller). A candidate at distance 0 from x has ratio 0,
        also when every image of S is a copy of x (0/0); one with a non-finite distance is ignored (it
        extracts nothing, and cannot poison the minimum with a NaN).

        Args:
            dists: [B, k] ascending normalized L2 distances to the k nearest training images.
            idx: [B, k] their training indices.
            seeds: [B] int64 seeds of the candidates.
            alpha: the ratio's alpha (SPEC §3).
        """
        ratio = _ratio(dists, alpha)
        j = idx[:, 0]
        old = self.ratio.clone()
        self.ratio.scatter_reduce_(0, j, ratio, "amin")
        # the smallest seed among the candidates that reach the (new) best ratio of their training image;
        # masked with torch.where, not boolean indexing, so that nothing here waits for the device. An ignored
        # candidate (ratio inf) is no hit: a training image no candidate reached keeps seed _BIG.
        hit = (ratio == self.ratio[j]) & torch.isfinite(ratio)
        cand = torch.full_like(self.seed, _BIG)
        cand.scatter_reduce_(0, j, torch.where(hit, seeds, _BIG), "amin")
        take = (self.ratio < old) | ((self.ratio == old) & (cand < self.seed))
        chosen = hit & (seeds == cand[j])  # same ratio and seed: the candidate that was taken
        cdist = torch.full_like(self.dist, math.inf)
        cdist.scatter_reduce_(0, j, torch.where(chosen, dists[:, 0], math.inf), "amin")
        self.seed = torch.where(take, cand, self.seed)
        self.dist = torch.where(take, cdist, self.dist)

    def mark(self, lo: int, hi: int) -> None:
        """Record that candidate indices [lo, hi) are folded in."""
        self.done = normalize([*self.done, (lo, hi)])

    def merge_(self, other: NNState) -> NNState:
        """Fold another state in (same tie rule as :meth:`update`); returns self."""
        if other.num_train != self.num_train:
            raise ValueError(f"NN states over {self.num_train} and {other.num_train} training images")
        o_ratio, o_seed, o_dist = (t.to(self.ratio.device) for t in (other.ratio, other.seed, other.dist))
        take = (o_ratio < self.ratio) | ((o_ratio == self.ratio) & (o_seed < self.seed))
        self.ratio = torch.where(take, o_ratio, self.ratio)
        self.seed = torch.where(take, o_seed, self.seed)
        self.dist = torch.where(take, o_dist, self.dist)
        self.done = normalize([*self.done, *other.done])
        return self

    def result(self, num_candidates: int, k: int, alpha: float) -> NNExtraction:
        ii = torch.nonzero(self.ratio <= 1).reshape(-1)
        return NNExtraction(
            tuple(ii.tolist()),
            tuple(self.seed[ii].tolist()),
            tuple(self.ratio[ii].tolist()),
            tuple(self.dist[ii].tolist()),
            num_candidates,
            self.num_train,
            k,
            alpha,
        )

    # persistence --------------------------------------------------------------------------------------
    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        """Atomically write the state (host copy; waits for the device) and its intervals."""
        from safetensors.torch import save

        tensors = {"ratio": self.ratio.cpu(), "seed": self.seed.cpu(), "dist": self.dist.cpu()}
        info = json.dumps({"done": [list(x) for x in self.done], **(meta or {})})
        md = {"memcore_nn": info, "memcore_nn_sha256": _state_digest(tensors, info)}
        _results.atomic_write_bytes(path, save(tensors, metadata=md))

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> tuple[NNState, dict[str, Any]]:
        """Read a part file; a damaged one is a clear error naming it."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                info = json.loads(md["memcore_nn"])
                t = {k: f.get_tensor(k) for k in ("ratio", "seed", "dist")}
            done = normalize(info.pop("done"))
            # a well-formed file with other arrays would merge by broadcasting, or promote the state's dtypes
            want = {"ratio": torch.float32, "seed": torch.int64, "dist": torch.float32}
            n = t["ratio"].shape[0] if t["ratio"].dim() == 1 else -1
            bad = [
                f"{k} {x.dtype} {list(x.shape)}"
                for k, x in t.items()
                if x.dtype != want[k] or x.shape != (n,)
            ]
            if bad or (done and done[0][0] < 0):
                raise ValueError(f"not an NN state: {', '.join(bad) or f'done {done}'}")
            # a flipped bit in the arrays or in the intervals (which say what is folded in) is well formed:
            # only the digest tells; a file written before states carried one is taken as it is
            want = md.get("memcore_nn_sha256")
            if want is not None and want != _state_digest(t, md["memcore_nn"]):
                raise ValueError("its contents do not match the sha256 recorded when it was written")
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise ValueError(
                f"NN checkpoint {path} is damaged ({type(exc).__name__}: {exc}); delete it to recompute its "
                "candidates"
            ) from exc
        st = cls(t["ratio"].shape[0], "cpu")
        st.ratio, st.seed, st.dist = (x.to(device) for x in (t["ratio"], t["seed"], t["dist"]))
        st.done = done
        return st, info


def _state_digest(tensors: dict[str, torch.Tensor], info: str) -> str:
    """sha256 of a state file's metadata text and arrays (name, dtype, shape, bytes), in a fixed order."""
    h = hashlib.sha256(info.encode("utf-8"))
    for k in ("ratio", "seed", "dist"):
        x = tensors[k].contiguous()
        h.update(f"|{k}|{x.dtype}|{list(x.shape)}|".encode())
        h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- results directory
def part_path(out: str | Path, shard: _results.ShardSpec) -> Path:
    return Path(out) / NN_DIR / f"state.part{shard.index}-of-{shard.count}.safetensors"


def part_files(out: str | Path) -> list[Path]:
    d = Path(out) / NN_DIR
    return sorted(p for p in d.iterdir() if _PART_RE.match(p.name)) if d.is_dir() else []


def load_parts(out: str | Path, num_train: int | None = None) -> tuple[NNState | None, list[Path]]:
    """Every part of a results directory merged into one host state (None when there is none)."""
    files = part_files(out)
    directory = _results.dir_params(Path(out)) if files else None
    merged: NNState | None = None
    # the size every part must cover: this run's, else the directory's record of it, else the first part's
    want, whose = num_train, "this run has"
    if want is None and isinstance((directory or {}).get("train"), dict):
        want, whose = directory["train"].get("num"), "the results directory's training set has"
    for f in files:
        st, info = NNState.load(f)
        # a part gathered from another run's directory (parts written before they carried parameters pass)
        _results.check_foreign(directory, Path(out), f, info.get("params"))
        if want is None:
            want, whose = st.num_train, f"{f.name} covers"
        if st.num_train != want:
            raise ValueError(
                f"NN checkpoint {f} covers {st.num_train} training images, {whose} {want}; it belongs to "
                "another run (the results directory's parameters should have caught this: was it copied?)"
            )
        merged = st if merged is None else merged.merge_(st)
    return merged, files


def covered(out: str | Path, num_train: int | None = None) -> list[Interval]:
    """Candidate intervals folded in by any part file (each checked as :func:`load_parts` does)."""
    st, _ = load_parts(out, num_train)
    return [] if st is None else st.done


def finalize(out: str | Path, num_candidates: int, k: int, alpha: float) -> NNExtraction | None:
    """Merge the parts; when they cover ``[0, num_candidates)`` write ``nn_extraction.json`` and return it.

    PNG pairs already present (written by the process that ran the winning candidate, or by an earlier
    finalize that could regenerate them) are referenced; missing ones stay None.
    """
    out = Path(out)
    st, _ = load_parts(out)
    if st is None or subtract([(0, num_candidates)], st.done):
        return None
    nn = st.result(num_candidates, min(k, st.num_train), alpha)  # k of S is at most the training set's size
    imgs = tuple(
        image_name(j, s) if (out / image_name(j, s)).exists() else None
        for j, s in zip(nn.extracted_train_indices, nn.seeds)
    )
    nn = dataclasses.replace(nn, images=imgs)
    _results.atomic_write_json(out / "nn_extraction.json", nn.to_dict())
    return nn


def progress(out: str | Path, num_candidates: int) -> dict[str, Any]:
    """How much of the NN range the part files cover (for summaries of unfinished runs)."""
    done = covered(out)
    return {"candidates_done": length(done), "candidates_total": num_candidates, "done_intervals": done}
