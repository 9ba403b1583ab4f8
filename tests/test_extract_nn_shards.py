"""NN extraction (SPEC §3) split over shards, checkpointed, interrupted and resumed: always the same result
as one uninterrupted process."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_extract import cfg, tiny_unet

from memcore.attacks import carlini
from memcore.attacks import nn as NN
from memcore.io import results as R


@pytest.fixture(scope="module")
def setup():
    model = tiny_unet(None, seed=1)
    g = torch.Generator().manual_seed(3)
    train = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=g)
    config = cfg(num_per_condition=6, nn_candidates=29, nn_k=4, batch_size=5, nn_checkpoint_s=0.0)
    # plant two of the run's own candidates so that something is extracted for sure
    from memcore.attacks.reference import load_reference_model, reference_generate

    rm = load_reference_model(model)
    planted = torch.cat(
        [reference_generate(rm, [config.seed + i], None, num_inference_steps=3) for i in (2, 17)]
    )
    train = torch.cat([train, planted])
    return model, config, train


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):
    model, config, train = setup
    out = tmp_path_factory.mktemp("single")
    return carlini.extract(model, None, config=config, train=train, out=out, device="cpu"), out


def _count_updates(monkeypatch) -> list[int]:
    """Patch ``NNState.update`` to record how many candidates each call folds in; returns that list."""
    sizes: list[int] = []
    orig_update = NN.NNState.update

    def counting(self, d, idx, seeds, alpha):
        sizes.append(seeds.numel())
        return orig_update(self, d, idx, seeds, alpha)

    monkeypatch.setattr(NN.NNState, "update", counting)
    return sizes


# ------------------------------------------------------------------------------------------------ intervals
def test_interval_helpers():
    assert NN.normalize([(5, 7), (0, 2), (2, 3), (6, 9), (4, 4)]) == [(0, 3), (5, 9)]
    assert NN.subtract([(0, 10)], [(2, 3), (5, 7), (9, 12)]) == [(0, 2), (3, 5), (7, 9)]
    assert NN.subtract([(0, 4)], [(0, 4)]) == []
    assert NN.length([(0, 3), (2, 5)]) == 5
    # the assignment partitions [0, n_nn): [0, N) with condition 0's owner, the rest split evenly
    for count in (1, 2, 3, 7, 40):
        parts = [NN.assignment(29, 6, R.ShardSpec(i, count)) for i in range(count)]
        assert NN.length([iv for p in parts for iv in p]) == 29
        assert sum(NN.length(p) for p in parts) == 29
    assert NN.assignment(29, 6, R.ShardSpec(1, 3))[0][0] >= 6


# -------------------------------------------------------------------------------------------------- shards
@pytest.mark.parametrize("count", [2, 3])
def test_shards_equal_single_process(setup, single, tmp_path, count):
    model, config, train = setup
    ref, _ = single
    assert ref.nn is not None and {40, 41} <= set(ref.nn.extracted_train_indices)
    for i in range(count):
        res = carlini.extract(
            model, None, config=config, train=train, out=tmp_path, device="cpu", shard=R.ShardSpec(i, count)
        )
        summary = json.loads((tmp_path / "summary.json").read_text())
        if i < count - 1:  # not all parts in yet: no result, a progress line instead
            assert res.nn is None and not (tmp_path / "nn_extraction.json").exists()
            assert summary["nn_progress"]["candidates_done"] < 29
            assert "In progress" in (tmp_path / "report.html").read_text()
        else:
            assert res.nn == ref.nn  # bit-identical ratios, seeds, distances; PNG names too
            assert summary["extracted_seeds"] == list(ref.nn.seeds)
    assert len(NN.part_files(tmp_path)) == count
    for rel in ref.nn.images:
        assert rel is None or (tmp_path / rel).is_file()


def test_merge_command_finalizes_nn(setup, single, tmp_path):
    """`memcore merge` (summarize_dir) merges NN parts into nn_extraction.json without the model."""
    model, config, train = setup
    ref, _ = single
    for i in range(2):
        carlini.extract(
            model, None, config=config, train=train, out=tmp_path, device="cpu", shard=R.ShardSpec(i, 2)
        )
    (tmp_path / "nn_extraction.json").unlink()
    s = carlini.summarize_dir(tmp_path)
    assert s["extracted_train_indices"] == list(ref.nn.extracted_train_indices)
    assert json.loads((tmp_path / "nn_extraction.json").read_text())["seeds"] == list(ref.nn.seeds)


def test_a_rank_merges_and_writes_its_summary_under_one_lock(setup, tmp_path, monkeypatch):
    """Two ranks finishing together: one that merged first but wrote its summary last replaced the complete
    summary.json and report.html with its own older ones. Merge and writes now hold one lock, so each summary
    written comes from a merge made after the one before it was written."""
    import fcntl
    import os

    from memcore.report import html

    model, config, train = setup
    held = []

    def locked() -> bool:
        fd = os.open(tmp_path / ".summary.lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    merge, write_json, write_report = R.merge_parts, R.atomic_write_json, html.write_report
    monkeypatch.setattr(R, "merge_parts", lambda out: held.append(("merge", locked())) or merge(out))

    def writing(f, obj):
        if Path(f).name == "summary.json":
            held.append(("summary", locked()))
        write_json(f, obj)

    monkeypatch.setattr(R, "atomic_write_json", writing)
    monkeypatch.setattr(
        html, "write_report", lambda *a: held.append(("report", locked())) or write_report(*a)
    )
    carlini.extract(
        model, None, config=config, train=train, out=tmp_path, device="cpu", shard=R.ShardSpec(0, 2)
    )
    carlini.summarize_dir(tmp_path)  # memcore merge
    assert held == [("merge", True), ("summary", True), ("report", True)] * 2
    assert json.loads((tmp_path / "summary.json").read_text())["counts"]["conditions_done"] == 1


def test_shards_gathered_from_another_run_are_refused_at_merge(setup, single, tmp_path):
    """The no-shared-filesystem recipe: each node runs its shard into its own directory, then parts/ and nn/
    are gathered into one. A shard run with other parameters (here nn_alpha) is named, not merged."""
    import shutil

    def gather(src, dst):
        for sub in ("parts", "nn"):
            if (src / sub).is_dir():
                (dst / sub).mkdir(exist_ok=True)
                for f in (src / sub).iterdir():
                    shutil.copy(f, dst / sub / f.name)

    model, config, train = setup
    ref, _ = single
    a, b = tmp_path / "a", tmp_path / "b"
    carlini.extract(model, None, config=config, train=train, out=a, device="cpu", shard=R.ShardSpec(0, 2))
    other = dataclasses.replace(config, nn_alpha=0.4)
    carlini.extract(model, None, config=other, train=train, out=b, device="cpu", shard=R.ShardSpec(1, 2))
    # part 1 holds no condition (the unconditional model's one condition is part 0's): only its NN checkpoint
    assert not (b / "parts").exists()
    gather(b, a)
    with pytest.raises(
        ValueError,
        match=r"state\.part1-of-2\.safetensors was written by another run .*nn_alpha: the directory has 0\.5, "
        r"the part has 0\.4",
    ):
        carlini.summarize_dir(a)
    assert not (a / "nn_extraction.json").exists()
    # the same shard run with the directory's parameters replaces it, and the merge gives the single run's result
    (a / "nn" / "state.part1-of-2.safetensors").unlink()
    carlini.extract(
        model, None, config=config, train=train, out=b / "ok", device="cpu", shard=R.ShardSpec(1, 2)
    )
    gather(b / "ok", a)
    s = carlini.summarize_dir(a)
    assert s["extracted_train_indices"] == list(ref.nn.extracted_train_indices)
    # gathered into a new folder (no params.json): the parts' own copies of the parameters serve
    new = tmp_path / "new"
    new.mkdir()
    gather(a, new)
    s = carlini.summarize_dir(new)
    assert s["extracted_train_indices"] == list(ref.nn.extracted_train_indices)
    assert R.load_params(new) == R.load_params(a)


# ---------------------------------------------------------------------------------------- interrupt/resume
class _Killed(Exception):
    pass


def test_interrupted_nn_resumes_from_checkpoint(setup, single, tmp_path, monkeypatch):
    model, config, train = setup
    ref, _ = single
    real = carlini._make_sampler
    seen = []

    def dying(*a, **kw):
        inner = real(*a, **kw)

        def gen(jobs):
            for k, imgs in enumerate(inner(jobs)):
                if k == 3:
                    raise _Killed
                seen.append(imgs.shape[0])
                yield imgs

        return gen

    monkeypatch.setattr(carlini, "_make_sampler", dying)
    with pytest.raises(_Killed):
        carlini.extract(model, None, config=config, train=train, out=tmp_path, device="cpu")
    monkeypatch.setattr(carlini, "_make_sampler", real)
    part = NN.part_path(tmp_path, R.ShardSpec())
    st, _ = NN.NNState.load(part)
    done_before = st.count
    assert 0 < done_before < 29  # checkpointed progress, not the whole range

    counted = _count_updates(monkeypatch)
    res = carlini.extract(model, None, config=config, train=train, out=tmp_path, device="cpu")
    assert sum(counted) == 29 - done_before  # only the missing candidates were folded in
    assert res.nn == ref.nn
    assert (tmp_path / "results.jsonl").read_text().count("\n") == 1


def test_reshard_after_partial_run(setup, single, tmp_path):
    """Parts written with one shard count are honoured by a rerun with another (here: one process)."""
    model, config, train = setup
    ref, _ = single
    carlini.extract(
        model, None, config=config, train=train, out=tmp_path, device="cpu", shard=R.ShardSpec(1, 3)
    )
    res = carlini.extract(model, None, config=config, train=train, out=tmp_path, device="cpu")
    assert res.nn == ref.nn


def test_damaged_checkpoint_is_a_clear_error(setup, tmp_path):
    model, config, train = setup
    part = NN.part_path(tmp_path, R.ShardSpec())
    carlini.extract(model, None, config=config, train=train, out=tmp_path, device="cpu")
    part.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="damaged"):
        carlini.extract(model, None, config=config, train=train, out=tmp_path, device="cpu")
    # a part over another training set, written before parts carried their run's parameters: named, not an
    # index error from deep inside the merge
    NN.NNState(7).save(part, {})
    with pytest.raises(ValueError, match=rf"covers 7 training images, this run has {len(train)}"):
        carlini.extract(model, None, config=config, train=train, out=tmp_path, device="cpu")


def test_nn_state_merge_is_order_free():
    g = torch.Generator().manual_seed(0)
    T = 16
    parts = []
    d = torch.rand(10, 4, generator=g).sort(1).values
    d[:3] = d[0]  # equal ratios for different seeds (in every part): the tie rule decides
    idx = torch.randint(6, T, (10, 4), generator=g)
    idx[:3, 0] = 5
    for p in range(3):
        st = NN.NNState(T)
        st.update(d, idx, torch.arange(10) + 100 * (2 - p), 0.5)
        st.mark(10 * p, 10 * p + 10)
        parts.append(st)
    a = NN.NNState(T).merge_(parts[0]).merge_(parts[1]).merge_(parts[2])
    b = NN.NNState(T).merge_(parts[2]).merge_(parts[0]).merge_(parts[1])
    assert torch.equal(a.ratio, b.ratio) and torch.equal(a.seed, b.seed) and torch.equal(a.dist, b.dist)
    assert a.done == [(0, 30)] and int(a.seed[5]) == 0  # the smallest seed among the tied


@pytest.mark.parametrize("nn_k", [4, 50])
def test_nn_result_matches_brute_force(setup, single, monkeypatch, nn_k):
    """The driven extraction against SPEC §3 evaluated in plain torch on the candidates the run generated:
    each candidate index is folded in exactly once, and a k beyond the training set (50 > 42) makes S the
    whole set (the result reports that k)."""
    from test_nn_extraction import brute_force

    model, config, train = setup
    ref, _ = single
    queries, seeds = [], []
    orig_knn, orig_update = carlini._Train.knn, NN.NNState.update

    def knn(self, q, k):
        queries.append(q.cpu().clone())
        return orig_knn(self, q, k)

    def update(self, d, idx, s, alpha):
        seeds.extend(s.tolist())
        return orig_update(self, d, idx, s, alpha)

    monkeypatch.setattr(carlini._Train, "knn", knn)
    monkeypatch.setattr(NN.NNState, "update", update)
    res = carlini.extract(
        model, None, config=dataclasses.replace(config, nn_k=nn_k), train=train, device="cpu"
    )
    assert sorted(seeds) == [config.seed + i for i in range(29)]
    assert res.nn.k == min(nn_k, 42) and res.nn.num_candidates == 29 and res.nn.num_train == 42
    want = brute_force(torch.cat(queries), seeds, train, min(nn_k, 42))
    ext = sorted(t for t, v in want.items() if v[0] <= 1)
    assert list(res.nn.extracted_train_indices) == ext and {40, 41} <= set(ext)
    assert list(zip(res.nn.ratios, res.nn.seeds, res.nn.distances)) == [want[t] for t in ext]
    if nn_k == 4:
        assert res.nn == dataclasses.replace(ref.nn, images=())


# ------------------------------------------------------------------------------------ streamed training set
def test_streamed_training_set_equals_whole(setup, single, tmp_path):
    """train_chunk streams the training set through the device in pieces: same NN result and records."""
    model, config, train = setup
    ref, ref_dir = single
    import dataclasses

    res = carlini.extract(
        model,
        None,
        config=dataclasses.replace(config, train_chunk=7),
        train=train,
        out=tmp_path,
        device="cpu",
    )
    assert res.nn == ref.nn
    want = R.load_results(ref_dir)
    assert R.load_results(tmp_path) == want and want[0]["nearest_train_index"] is not None


def test_streamed_verification_ties_and_counts():
    """Nearest image across chunks: ties go to the smallest index, the eidetic count adds up over chunks."""
    g = torch.Generator().manual_seed(5)
    train = torch.randint(0, 256, (23, 1, 8, 8), dtype=torch.uint8, generator=g)
    img = train[4:5].clone()
    train[11] = img[0]
    train[19] = img[0]  # three exact copies in three different chunks of 5
    for chunk in (None, 5, 1, 100):
        tr = carlini._Train(train, torch.device("cpu"), "auto", chunk)
        j, d, c, match = tr.nearest(img, 0.0)
        assert (int(j), float(d), int(c)) == (4, 0.0, 3)
        assert torch.equal(match, img)
        dd, ii = tr.knn(train[[4, 0, 22]], 6)
        from memcore.distance import knn

        wd, wi = knn(train[[4, 0, 22]], train, 6)
        assert torch.equal(dd, wd) and torch.equal(ii, wi)
        assert ii[0, :3].tolist() == [4, 11, 19]


@pytest.mark.parametrize("block", [1, 7, None])
def test_nn_blocks_do_not_change_the_result(setup, single, monkeypatch, block):
    """Candidates meet the training set in blocks (one k-NN per block, not per micro-batch): any block size
    gives the uninterrupted run's result, and the default folds this small run in with one k-NN."""
    model, config, train = setup
    ref, _ = single
    if block is not None:
        monkeypatch.setattr(carlini, "NN_BLOCK_MAX", block)
    sizes = _count_updates(monkeypatch)
    res = carlini.extract(model, None, config=config, train=train, device="cpu")
    assert res.nn == dataclasses.replace(ref.nn, images=())  # no results directory: no PNGs
    assert sum(sizes) == 29
    if block is None:
        assert sizes == [29]
    else:  # flushed once the block holds >= `block` candidates: after every batch of 5 or every other one
        assert len(sizes) == (6 if block == 1 else 3), sizes
