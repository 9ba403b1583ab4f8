"""The NN extraction state of SPEC §3 (``memcore.attacks.nn.NNState``) against a brute-force reference in
plain torch/Python: ratio, nearest image, S, ties, 0/0, non-finite distances, merge order, checkpoints."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from memcore.attacks import carlini
from memcore.attacks import nn as NN
from memcore.distance import knn
from memcore.io import results as R

ALPHA = 0.5


def _l2_matrix(q: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """[N, T] normalized L2 of uint8 images in float64, rounded to float32 once (what memcore computes)."""
    diff = (q[:, None].double() - train[None].double()) / 255
    return diff.pow(2).flatten(2).mean(2).sqrt().float()


def brute_force(q: torch.Tensor, seeds: list[int], train: torch.Tensor, k: int) -> dict[int, tuple]:
    """Per training image ``x``: (ratio, seed, distance) of the best candidate whose nearest image is ``x``.

    SPEC §3 read literally: x is the nearest training image (smallest index among equally near ones), S the
    k nearest (x included), ``ratio = l2(x̂, x) / (alpha · mean_S l2(x̂, y))`` evaluated in exact arithmetic
    (``math.fsum``) and rounded to float32; 0 when the candidate is a copy of x; the best candidate has the
    smallest ratio, then the smallest seed.
    """
    d = _l2_matrix(q, train)
    best: dict[int, tuple] = {}
    for row, seed in zip(d.tolist(), seeds):
        order = sorted(range(len(row)), key=lambda t: (row[t], t))[:k]
        near = [row[t] for t in order]
        ratio = 0.0 if near[0] == 0 else near[0] / (ALPHA * (math.fsum(near) / k))
        ratio = torch.tensor(ratio, dtype=torch.float32).item()
        x = order[0]
        if x not in best or (ratio, seed) < best[x][:2]:
            best[x] = (ratio, seed, near[0])
    return best


def _state_dict(st: NN.NNState) -> dict[int, tuple]:
    return {
        t: (float(st.ratio[t]), int(st.seed[t]), float(st.dist[t]))
        for t in range(st.num_train)
        if int(st.seed[t]) != NN._BIG
    }


@pytest.fixture(scope="module")
def data():
    """12 training images (two exact duplicates, and three copies of one image) and 40 candidates: copies of
    training images (also under several seeds: exact ratio ties), near copies, and noise."""
    g = torch.Generator().manual_seed(7)
    train = torch.randint(0, 256, (12, 3, 4, 4), dtype=torch.uint8, generator=g)
    train[9] = train[2]
    train[10] = train[11] = train[5]
    noise = torch.randint(0, 256, (12, 3, 4, 4), dtype=torch.uint8, generator=g)
    near = train[[0, 1, 3, 4, 6]].clone()
    near[:, 0, 0, 0] ^= 1
    q = torch.cat([train[[0, 2, 5, 7, 7, 9, 11]], near, near, noise, train[[3, 3, 3]], noise[:8] // 2 + 64])
    seeds = random.Random(3).sample(range(1000, 2000), q.shape[0])
    return q, seeds, train


@pytest.mark.parametrize("k", [1, 3, 12])
def test_update_matches_brute_force_in_any_batching_and_merge_order(data, k):
    q, seeds, train = data
    want = brute_force(q, seeds, train, k)
    assert want[2][0] == 0 and want[5][0] == 0  # copies of duplicated images: x is the first of them
    assert 9 not in want and 10 not in want and 11 not in want
    if k == 3:  # S = the three copies of image 5: 0/0, an exact copy
        assert want[5][2] == 0 and want[5][0] == 0
    d, i = knn(q, train, k)
    rng = random.Random(k)
    for trial in range(6):
        perm = list(range(q.shape[0]))
        rng.shuffle(perm)
        cuts = sorted(rng.sample(range(1, q.shape[0]), trial))
        parts = []
        for lo, hi in zip([0, *cuts], [*cuts, q.shape[0]]):
            st = NN.NNState(train.shape[0])
            for s in range(lo, hi, 3):  # several updates per part, one to three candidates each
                r = torch.tensor(perm[s : min(hi, s + 3)])
                st.update(d[r], i[r], torch.tensor(seeds)[r], ALPHA)
            st.mark(lo, hi)
            parts.append(st)
        rng.shuffle(parts)
        merged = NN.NNState(train.shape[0])
        for st in parts:
            merged.merge_(st)
        assert _state_dict(merged) == want, (trial, k)
        assert merged.done == [(0, q.shape[0])]
        res = merged.result(q.shape[0], k, ALPHA)
        ext = sorted(t for t, v in want.items() if v[0] <= 1)
        assert list(res.extracted_train_indices) == ext
        assert list(res.seeds) == [want[t][1] for t in ext]


def test_exact_ratio_ties_go_to_the_smallest_seed(data):
    """Three copies of one training image under three seeds: the smallest seed wins, whatever the order."""
    _, _, train = data
    img = train[[3, 3, 3]]
    d, i = knn(img, train, 4)
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        st = NN.NNState(train.shape[0])
        for r in order:
            st.update(d[r : r + 1], i[r : r + 1], torch.tensor([[50, 20, 90][r]]), ALPHA)
        assert (float(st.ratio[3]), int(st.seed[3]), float(st.dist[3])) == (0.0, 20, 0.0)


def test_ratio_does_not_depend_on_memory_layout():
    """The same distances in another memory layout (as another backend, batch or device may hand them over)
    give bit-identical ratios: a float32 ``mean`` sums in a layout-dependent order."""
    g = torch.Generator().manual_seed(1)
    train = torch.randint(0, 256, (60, 3, 8, 8), dtype=torch.uint8, generator=g)
    q = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
    d, i = knn(q, train, 50)
    a, b = NN.NNState(60), NN.NNState(60)
    seeds = torch.arange(64)
    a.update(d, i, seeds, ALPHA)
    b.update(d.t().contiguous().t(), i, seeds, ALPHA)  # column-major copy of the same values
    assert torch.equal(a.ratio, b.ratio) and torch.equal(a.seed, b.seed)
    want = brute_force(q, seeds.tolist(), train, 50)
    assert _state_dict(a) == want


def test_non_finite_distances_extract_nothing():
    """A candidate with a NaN/inf distance (a diverged float sample) extracts nothing and does not block a
    valid candidate for the same training image; a copy (distance 0) has ratio 0 even when mean(S) is 0."""
    nan, inf = math.nan, math.inf
    st = NN.NNState(4)
    d = torch.tensor([[nan, nan, nan], [0.1, 0.2, inf], [0.0, 0.0, 0.0], [0.1, 0.3, 0.3]])
    i = torch.tensor([[0, 1, 2], [1, 0, 2], [2, 3, 1], [0, 2, 1]])
    st.update(d[:3], i[:3], torch.tensor([1, 2, 3]), ALPHA)
    assert st.result(3, 3, ALPHA).extracted_train_indices == (2,)
    assert int(st.seed[0]) == NN._BIG and int(st.seed[1]) == NN._BIG and float(st.ratio[0]) == inf
    st.update(d[3:], i[3:], torch.tensor([4]), ALPHA)  # 0.1 / (0.5 · 0.7 / 3) <= 1
    res = st.result(4, 3, ALPHA)
    assert res.extracted_train_indices == (0, 2) and res.seeds == (4, 3) and res.ratios[1] == 0.0
    assert not any(math.isnan(x) for x in st.ratio.tolist() + st.dist.tolist())


# ------------------------------------------------------------------------------------------- checkpoints
def test_save_load_round_trip_is_exact(data, tmp_path):
    q, seeds, train = data
    d, i = knn(q, train, 3)
    st = NN.NNState(train.shape[0])
    st.update(d, i, torch.tensor(seeds), ALPHA)
    st.mark(0, 20)
    st.mark(30, 40)
    p = tmp_path / "nn" / "state.part0-of-1.safetensors"
    st.save(p, {"params": {"nn_k": 3}})
    back, info = NN.NNState.load(p)
    assert info == {"params": {"nn_k": 3}} and back.done == [(0, 20), (30, 40)]
    for a, b in ((st.ratio, back.ratio), (st.seed, back.seed), (st.dist, back.dist)):
        assert a.dtype == b.dtype and b.device.type == "cpu" and torch.equal(a, b)
    assert int(back.seed[11]) == NN._BIG and float(back.ratio[11]) == math.inf  # no candidate: sentinels
    # the loaded state is updated in place and saved over its own file: the file changes only by the save
    before = p.read_bytes()
    back.update(d[:1], i[:1], torch.tensor([1]), ALPHA)
    assert p.read_bytes() == before
    back.save(p)
    again, _ = NN.NNState.load(p)
    assert torch.equal(again.seed, back.seed) and int(again.seed[int(i[0, 0])]) == 1


@pytest.mark.parametrize(
    "tensors, done",
    [
        ({"ratio": torch.zeros(3), "seed": torch.zeros(4, dtype=torch.int64), "dist": torch.zeros(3)}, []),
        ({"ratio": torch.zeros(3), "seed": torch.zeros(3, dtype=torch.int32), "dist": torch.zeros(3)}, []),
        (
            {
                "ratio": torch.zeros(3),
                "seed": torch.zeros(3, dtype=torch.int64),
                "dist": torch.zeros(3).double(),
            },
            [],
        ),
        ({"ratio": torch.zeros(1, 3), "seed": torch.zeros(3, dtype=torch.int64), "dist": torch.zeros(3)}, []),
        (
            {"ratio": torch.zeros(3), "seed": torch.zeros(3, dtype=torch.int64), "dist": torch.zeros(3)},
            [[-2, 1]],
        ),
    ],
)
def test_load_refuses_a_malformed_state(tmp_path, tensors, done):
    """A readable safetensors file whose arrays are not an NN state (shapes, dtypes) is refused by name,
    not merged by broadcasting or dtype promotion."""
    from safetensors.torch import save

    p = tmp_path / "state.part0-of-1.safetensors"
    p.write_bytes(save(tensors, metadata={"memcore_nn": json.dumps({"done": done})}))
    with pytest.raises(ValueError, match=r"state\.part0-of-1\.safetensors is damaged"):
        NN.NNState.load(p)


def test_truncated_checkpoint_is_refused(tmp_path):
    p = tmp_path / "state.part0-of-1.safetensors"
    NN.NNState(5).save(p)
    raw = p.read_bytes()
    for cut in (0, 8, len(raw) // 2, len(raw) - 1):
        p.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="damaged"):
            NN.NNState.load(p)


def _small_state(t: int = 10) -> NN.NNState:
    st = NN.NNState(t)
    st.ratio[:] = 2.0
    st.ratio[3] = 0.5
    st.seed[:] = 7
    st.dist[:] = 0.25
    st.mark(0, 64)
    return st


def test_a_flipped_bit_in_a_checkpoint_is_refused_and_old_checkpoints_still_load(tmp_path):
    f = tmp_path / "state.part0-of-1.safetensors"
    _small_state().save(f, {"params": {"a": 1}})
    raw = f.read_bytes()
    assert NN.NNState.load(f)[0].done == [(0, 64)]
    flips = [len(raw) - 3, raw.index(b"64]]")]  # a ratio (the last array), the folded-in intervals
    for i in flips:
        bad = bytearray(raw)
        bad[i] ^= 0x08  # "6" -> ">" is no JSON; the ratio 2.0 -> another float
        bad[i] = ord("9") if i == flips[1] else bad[i]  # [[0, 94]]: well formed, 30 candidates never run
        f.write_bytes(bytes(bad))
        with pytest.raises(ValueError, match=r"NN checkpoint .* is damaged .*sha256.*delete it"):
            NN.NNState.load(f)
    # a checkpoint written before states carried a digest is taken as it is
    from safetensors.torch import save

    st = _small_state()
    f.write_bytes(
        save(
            {"ratio": st.ratio, "seed": st.seed, "dist": st.dist},
            metadata={"memcore_nn": '{"done": [[0, 64]]}'},
        )
    )
    assert NN.NNState.load(f)[0].done == [(0, 64)]


def test_a_merge_without_the_training_set_size_reports_the_k_the_run_used(tmp_path):
    # params.json without train.num (hand-made, or from a tool writing its own): S had min(nn_k, T) images
    params = {
        "model": "m",
        "model_kind": "unet",
        "num_conditions": 1,
        "num_per_condition": 4,
        "nn_candidates": 4,
        "nn_k": 50,
        "nn_alpha": 0.5,
        "train": {"source": "t.npz"},
    }
    R.atomic_write_json(
        tmp_path / "params.json", {"format": 1, "fingerprint": R.fingerprint(params), "params": params}
    )
    st = _small_state(10)
    st.done = [(0, 4)]
    st.save(NN.part_path(tmp_path, R.ShardSpec(0, 1)), {"params": params})
    s = carlini.summarize_dir(tmp_path, report=False)
    assert s["nn_extraction"]["k"] == 10 and s["extracted_train_indices"] == [3]
    assert json.loads((tmp_path / "nn_extraction.json").read_text())["k"] == 10
    assert not math.isnan(s["nn_extraction"]["alpha"])


def test_parts_over_other_training_sets_are_named(tmp_path):
    # merged without the run's own size (memcore merge), two parts of different sizes failed in merge_ with
    # "NN states over 10 and 12 training images", naming neither file
    for i, t in enumerate((10, 12)):
        _small_state(t).save(NN.part_path(tmp_path, R.ShardSpec(i, 2)), {})
    with pytest.raises(
        ValueError,
        match=r"state\.part1-of-2\.safetensors covers 12 training images, state\.part0-of-2.* covers 10",
    ):
        NN.load_parts(tmp_path)
