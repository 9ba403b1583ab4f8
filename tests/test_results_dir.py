"""Resumable results directory: crash-safe appends, torn tails, parameter mismatch, shard merge."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest

from memcore.io import results as R

PARAMS = {"model": "m", "num_per_condition": 8, "alpha": 0.1, "grid": [4, 4]}


def rec(g: int) -> dict:
    return {
        "condition_id": g,
        "condition": f"p{g}",
        "flagged": g % 2 == 0,
        "clique_size": g,
        "medoid_seed": 10 * g,
    }


def test_append_read_roundtrip(tmp_path):
    with R.ResultsDir(tmp_path, PARAMS) as rd:
        for g in range(5):
            rd.append(rec(g))
    got = R.load_results(tmp_path)
    assert got == [rec(g) for g in range(5)]
    assert json.loads((tmp_path / "params.json").read_text())["params"]["alpha"] == 0.1


def test_torn_tail_dropped_and_truncated_on_resume(tmp_path):
    with R.ResultsDir(tmp_path, PARAMS) as rd:
        for g in range(3):
            rd.append(rec(g))
    path = tmp_path / "results.jsonl"
    full = path.read_bytes()
    # simulate kill -9 in the middle of writing record 3
    line3 = R.encode_record(rec(3))
    path.write_bytes(full + line3[: len(line3) // 2])
    info = R.read_records(path)
    assert info.torn_tail and [r["condition_id"] for r in info.records] == [0, 1, 2]
    with R.ResultsDir(tmp_path, PARAMS) as rd:
        assert rd.completed_ids() == {0, 1, 2}
        rd.append(rec(3))
    assert path.read_bytes() == full + line3
    assert R.load_results(tmp_path) == [rec(g) for g in range(4)]


def test_torn_tail_garbled_but_newline_terminated(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(R.encode_record(rec(0)) + b'{"condition_id": 1, "fl\n')
    info = R.read_records(path)
    assert info.torn_tail and len(info.records) == 1


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(R.encode_record(rec(0)) + b"garbage\n" + R.encode_record(rec(2)))
    with pytest.raises(ValueError, match="line 2"):
        R.read_records(path)


def test_param_mismatch_refused_listing_each_difference(tmp_path):
    R.ResultsDir(tmp_path, PARAMS).close()
    other = {**PARAMS, "alpha": 0.2, "num_per_condition": 9}
    with pytest.raises(ValueError) as ei:
        R.ResultsDir(tmp_path, other)
    msg = str(ei.value)
    assert "alpha: directory has 0.1, this run has 0.2" in msg
    assert "num_per_condition: directory has 8, this run has 9" in msg
    assert "\n" not in msg
    # nothing was written by the refused run
    assert json.loads((tmp_path / "params.json").read_text())["params"] == PARAMS


def test_parameters_added_later_do_not_refuse_older_directories(tmp_path):
    old = {**PARAMS, "train": {"source": "t.npy", "num": 3}}
    with R.ResultsDir(tmp_path, old) as rd:
        rd.append(rec(0))
    before = (tmp_path / "params.json").read_text()
    added = ("model_sha256", "train.sha256")
    newer = {**PARAMS, "model_sha256": "ab", "train": {"source": "t.npy", "num": 3, "sha256": "cd"}}
    with (  # started before those keys existed: resumes, and says what it cannot check
        pytest.warns(
            UserWarning, match=r": not checked, as the directory predates them: model_sha256, train\.sha256$"
        ),
        R.ResultsDir(tmp_path, newer, added=added) as rd,
    ):
        assert rd.params == old and rd.completed_ids() == {0}
        rd.append(rec(1))
    assert (tmp_path / "params.json").read_text() == before
    # without ``added`` they are differences; and other differences are still refused with them
    with pytest.raises(
        ValueError, match=r"model_sha256 \(the model's weights\): directory has no value, this run has \"ab\""
    ):
        R.ResultsDir(tmp_path, newer, added=())
    with pytest.warns(UserWarning, match="predates them"):
        assert R.ResultsDir(tmp_path, newer).params == old  # the extraction's keys are the default
    with pytest.raises(ValueError, match=r"results\. alpha: directory has 0.1, this run has 0.2\. Use"):
        R.ResultsDir(tmp_path, {**newer, "alpha": 0.2}, added=added)
    # a directory that has the key compares it like any other
    R.ResultsDir(tmp_path / "new", newer, added=added).close()
    R.ResultsDir(tmp_path / "new", newer, added=added).close()
    with pytest.raises(
        ValueError, match=r"model_sha256 \(the model's weights\): directory has \"ab\", this run has \"ef\""
    ):
        R.ResultsDir(tmp_path / "new", {**newer, "model_sha256": "ef"}, added=added)
    with pytest.raises(
        ValueError,
        match=r"results\. train\.sha256 \(the training images\): directory has \"cd\", this run has \"ef\"\. Use",
    ):
        R.ResultsDir(tmp_path / "new", {**newer, "train": {**newer["train"], "sha256": "ef"}}, added=added)


def test_where_the_model_was_found_does_not_count_when_its_digest_is_equal(tmp_path, monkeypatch):
    start = {
        **PARAMS,
        "model": "/a/model",
        "model_sha256": "ab",
        "train": {"source": "/a/t.npy", "num": 3, "sha256": "cd"},
    }
    with R.ResultsDir(tmp_path, start) as rd:
        rd.append(rec(0))
    moved = {**start, "model": "/b/model", "train": {**start["train"], "source": "<tensor>"}}
    # the same weights and images, found elsewhere: resumes as started, and says so
    notice = r'resuming .*: model: this run has "/b/model", the directory "/a/model" \(same model_sha256\); '
    notice += r'train\.source: this run has "<tensor>", the directory "/a/t\.npy" \(same train\.sha256\)$'
    with pytest.warns(UserWarning, match=notice), R.ResultsDir(tmp_path, moved) as rd:
        assert rd.params == start and rd.completed_ids() == {0}
    # under torchrun only local rank 0 says it (once per node, not once per rank)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with R.ResultsDir(tmp_path, moved) as rd:
            assert rd.params == start
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.warns(UserWarning, match=notice):
        R.ResultsDir(tmp_path, moved).close()
    monkeypatch.delenv("LOCAL_RANK")
    other = {**moved, "model_sha256": "ef"}
    with pytest.raises(
        ValueError,
        match=r"results\. model: directory has \"/a/model\", this run has \"/b/model\"; model_sha256",
    ):
        R.ResultsDir(tmp_path, other)
    # without a digest the location is all there is to compare
    R.ResultsDir(tmp_path / "plain", PARAMS).close()
    with pytest.raises(ValueError, match=r"results\. model: directory has \"m\", this run has \"/b\"\. Use"):
        R.ResultsDir(tmp_path / "plain", {**PARAMS, "model": "/b"})


def test_choices_that_cannot_change_a_record_compare_as_one(tmp_path):
    run = {**PARAMS, "model_kind": "class_unet", "train": None, "batch_size": None, "nn_k": 50}
    with R.ResultsDir(tmp_path, run) as rd:
        rd.append(rec(0))
    # the default micro-batch (min(N, 64) = 8) asked for by its value, an NN option the run never reads
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same run: nothing to say
        with R.ResultsDir(tmp_path, {**run, "batch_size": 8, "nn_k": 7}) as rd:
            assert rd.params == run and rd.completed_ids() == {0}
    with pytest.raises(ValueError, match=r"batch_size: directory has 8, this run has 4\. Use"):
        R.ResultsDir(tmp_path, {**run, "batch_size": 4})
    # where the NN extraction runs (an unconditional model with a training set) its options count
    nn = {**run, "model_kind": "unet", "train": {"sha256": "cd"}, "nn_candidates": None}
    R.ResultsDir(tmp_path / "nn", nn).close()
    R.ResultsDir(tmp_path / "nn", {**nn, "nn_candidates": 8}).close()  # None = N
    with pytest.raises(ValueError, match=r"nn_k: directory has 50, this run has 7\. Use"):
        R.ResultsDir(tmp_path / "nn", {**nn, "nn_k": 7})
    with pytest.raises(ValueError, match=r"nn_candidates: directory has 8, this run has 9\. Use"):
        R.ResultsDir(tmp_path / "nn", {**nn, "nn_candidates": 9})
    canon = R.canonical_params({**nn, "train": None})
    assert canon == {**PARAMS, "model_kind": "unet", "train": None, "batch_size": 8}


def test_a_rank_taking_params_back_beside_a_writing_rank_leaves_them(tmp_path, monkeypatch):
    # rank 0 opens the directory (writes params.json), rank 1 resumes it; rank 0 then fails before writing a
    # record (out of memory on its own GPU, say) and takes params.json back, while rank 1 goes on
    out = tmp_path / "run"
    a = R.ResultsDir(out, PARAMS, shard=R.ShardSpec(0, 2))
    b = R.ResultsDir(out, PARAMS, shard=R.ShardSpec(1, 2))
    a.abandon()
    assert not out.exists()
    b.append(rec(1))  # its first file: it looks for params.json after, finds it gone, writes it again
    b.close()
    assert R.load_params(out) == PARAMS and R.merge_parts(out) == [rec(1)]
    # rank 1's first file appears after rank 0 looked and took params.json back, and rank 1 (here made not to
    # look) found it still there: rank 0 looks again and restores it
    out = tmp_path / "run2"
    a = R.ResultsDir(out, PARAMS, shard=R.ShardSpec(0, 2))
    b = R.ResultsDir(out, PARAMS, shard=R.ShardSpec(1, 2))
    monkeypatch.setattr(b, "keep_params", lambda: None)
    unlink = type(out).unlink

    def unlink_then_rank1_writes(self, *args, **kwargs):
        unlink(self, *args, **kwargs)
        if self.name == R.PARAMS_FILE:
            b.append(rec(1))

    monkeypatch.setattr(type(out), "unlink", unlink_then_rank1_writes)
    a.abandon()
    b.close()
    assert R.load_params(out) == PARAMS and R.merge_parts(out) == [rec(1)]
    # alone, rank 0 takes everything back
    monkeypatch.undo()
    R.ResultsDir(tmp_path / "run3", PARAMS).abandon()
    assert not (tmp_path / "run3").exists()


def test_parts_gathered_from_another_run_are_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with R.ResultsDir(a, PARAMS, shard=R.ShardSpec(0, 2)) as rd:
        rd.append(rec(0))
    assert (a / "parts" / "results.part0-of-2.params.json").is_file()
    with R.ResultsDir(b, {**PARAMS, "alpha": 0.2}, shard=R.ShardSpec(1, 2)) as rd:
        rd.append(rec(1))
    # another machine's shard copied in (as the multi-node recipe without a shared filesystem does)
    for name in ("results.part1-of-2.jsonl", "results.part1-of-2.params.json"):
        (a / "parts" / name).write_bytes((b / "parts" / name).read_bytes())
    before = (a / "parts" / "results.part0-of-2.jsonl").read_bytes()
    msg = r"results\.part1-of-2\.jsonl was written by another run than .*: alpha: the directory has 0\.1, the part has 0\.2\. Move it"
    with pytest.raises(ValueError, match=msg):
        R.merge_parts(a)
    assert (
        not (a / "results.jsonl").exists()
        and (a / "parts" / "results.part0-of-2.jsonl").read_bytes() == before
    )
    with pytest.raises(ValueError, match=msg):
        R.ResultsDir(a, PARAMS, shard=R.ShardSpec(0, 2))
    with pytest.raises(ValueError, match=msg):
        R.load_results(a)
    (a / "parts" / "results.part1-of-2.params.json").write_text("{not json")
    with pytest.raises(
        ValueError, match=r"params\.json is corrupt .*delete it to take results\.part1-of-2\.jsonl unchecked"
    ):
        R.merge_parts(a)
    # the same run's part (its own parameters, or none: written before parts carried them) merges
    (a / "parts" / "results.part1-of-2.params.json").unlink()
    assert [r["condition_id"] for r in R.merge_parts(a)] == [0, 1]
    R.atomic_write_json(a / "parts" / "results.part1-of-2.params.json", {"params": {**PARAMS, "model": "m"}})
    assert [r["condition_id"] for r in R.merge_parts(a)] == [0, 1]


def test_arrays_in_records_become_lists():
    import numpy as np
    import torch

    rec = {
        "a": np.array([0.5, 1.0]),
        "b": torch.tensor([[1, 2]]),
        "c": np.float32(0.25),
        "d": torch.tensor(3),
    }
    assert json.loads(R.encode_record(rec)) == {"a": [0.5, 1.0], "b": [[1, 2]], "c": 0.25, "d": 3}


def test_a_newer_format_is_not_appended_to(tmp_path):
    R.ResultsDir(tmp_path, PARAMS).close()
    stored = json.loads((tmp_path / "params.json").read_text())
    v = R.FORMAT_VERSION
    R.atomic_write_json(tmp_path / "params.json", {**stored, "format": v + 1})
    with pytest.raises(
        ValueError, match=rf"a newer memcore \(results format {v + 1}, this one reads up to {v}\)"
    ):
        R.ResultsDir(tmp_path, PARAMS)


def test_no_resume_refuses_existing_records(tmp_path):
    with R.ResultsDir(tmp_path, PARAMS) as rd:
        rd.append(rec(0))
    with pytest.raises(ValueError, match="already holds 1 finished"):
        R.ResultsDir(tmp_path, PARAMS, resume=False)


def test_out_is_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        R.ResultsDir(f, PARAMS)


def test_shards_merge_without_duplicates(tmp_path):
    ids = list(range(11))
    for i in range(3):
        spec = R.ShardSpec(i, 3)
        with R.ResultsDir(tmp_path, PARAMS, shard=spec) as rd:
            for g in spec.select(ids):
                rd.append(rec(g))
    # an earlier interrupted single-process attempt wrote some of the same conditions
    (tmp_path / "results.jsonl").write_bytes(R.encode_record(rec(4)) + R.encode_record(rec(0)))
    merged = R.merge_parts(tmp_path)
    assert [r["condition_id"] for r in merged] == ids
    assert R.merge_parts(tmp_path) == merged  # idempotent
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(ids)
    # resuming with a different shard layout sees everything as finished
    with R.ResultsDir(tmp_path, PARAMS, shard=R.ShardSpec(1, 2)) as rd:
        assert rd.completed_ids() == set(ids)


def test_shard_parsing_and_env():
    assert R.parse_shard("2/5") == R.ShardSpec(2, 5)
    for bad in ("5/5", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError):
            R.parse_shard(bad)
    assert R.shard_from_env({}) == R.ShardSpec()
    assert R.shard_from_env({"RANK": "3", "WORLD_SIZE": "4"}) == R.ShardSpec(3, 4)
    assert R.shard_from_env({"WORLD_SIZE": "1"}) == R.ShardSpec()
    # every process took itself for rank 0 of 8 and ran part 0: seven parts never ran
    with pytest.raises(ValueError, match="WORLD_SIZE=8 but no RANK"):
        R.shard_from_env({"WORLD_SIZE": "8"})
    for rank, world in (("8", "8"), ("-1", "2"), ("0", "0")):
        with pytest.raises(ValueError, match=f"RANK={rank} is not a rank of WORLD_SIZE={world}"):
            R.shard_from_env({"RANK": rank, "WORLD_SIZE": world})
    combined = [R.ShardSpec(i, 2).combine(R.ShardSpec(r, 3)) for i in range(2) for r in range(3)]
    owners = [[c.owns(g) for c in combined].count(True) for g in range(50)]
    assert owners == [1] * 50


def test_second_writer_on_same_part_refused(tmp_path):
    rd = R.ResultsDir(tmp_path, PARAMS)
    rd.append(rec(0))
    with pytest.raises(RuntimeError, match="another memcore run"):
        R.RecordWriter(tmp_path / "results.jsonl")
    rd.close()


def test_summary_atomic(tmp_path):
    with R.ResultsDir(tmp_path, PARAMS) as rd:
        p = rd.write_summary({"counts": {"flagged": 1}, "t": float("inf")})
    assert json.loads(p.read_text()) == {"counts": {"flagged": 1}, "t": None}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_kill9_subprocess_loses_at_most_in_flight(tmp_path):
    """A writer killed with SIGKILL mid-run: every surviving record is intact, none duplicated on resume."""
    script = textwrap.dedent(
        f"""
        import os, sys, signal
        sys.path.insert(0, {os.getcwd()!r})
        from memcore.io import results as R
        rd = R.ResultsDir(sys.argv[1], {PARAMS!r})
        for g in range(1000):
            rd.append({{"condition_id": g, "pad": "x" * 5000}})
            if g == 37:
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True)
    assert p.returncode == -9
    done = R.load_results(tmp_path)
    assert [r["condition_id"] for r in done] == list(range(38))
    with R.ResultsDir(tmp_path, PARAMS) as rd:
        todo = [g for g in range(40) if g not in rd.completed_ids()]
        for g in todo:
            rd.append({"condition_id": g, "pad": "x" * 5000})
    assert [r["condition_id"] for r in R.load_results(tmp_path)] == list(range(40))


def test_local_rank_must_be_an_integer():
    assert R.local_rank_from_env({"LOCAL_RANK": "3"}) == 3 and R.local_rank_from_env({}) is None
    with pytest.raises(ValueError, match="LOCAL_RANK must be an integer, got 'x'"):
        R.local_rank_from_env({"LOCAL_RANK": "x"})


def test_atomic_writes_have_the_mode_a_plain_open_gives(tmp_path):
    # mkstemp's 0600 made summary.json and report.html unreadable to the other users of a shared filesystem
    p = tmp_path / "summary.json"
    R.atomic_write_json(p, {"a": 1})
    assert p.stat().st_mode & 0o777 == 0o666 & ~R._UMASK
    os.chmod(p, 0o640)  # a rewrite keeps the mode the file has
    R.atomic_write_json(p, {"a": 2})
    assert p.stat().st_mode & 0o777 == 0o640 and json.loads(p.read_text()) == {"a": 2}
    # results.jsonl too (it was 0o644 less the umask: with umask 002, the summary group-writable, it not)
    old = os.umask(0o002)
    try:
        R.RecordWriter(tmp_path / "results.jsonl").close()
    finally:
        os.umask(old)
    assert (tmp_path / "results.jsonl").stat().st_mode & 0o777 == 0o664


def test_a_merge_beside_a_running_whole_run_loses_none_of_its_records(tmp_path):
    # `memcore merge DIR` while a single-process extract appends to DIR/results.jsonl: replaced, the file the
    # writer holds was unlinked, and every record appended after the merge went nowhere
    with R.ResultsDir(tmp_path, PARAMS) as rd, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        rd.append(rec(0))
        assert [r["condition_id"] for r in R.merge_parts(tmp_path)] == [0]
        rd.append(rec(1))
    assert [r["condition_id"] for r in R.load_results(tmp_path)] == [0, 1]
    assert [str(w.message).split(" is being written by a running memcore extract;")[0] for w in said] == [
        str(tmp_path / "results.jsonl")
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the run over: the merge rewrites the file, saying nothing
        assert [r["condition_id"] for r in R.merge_parts(tmp_path)] == [0, 1]
    with R.ResultsDir(tmp_path, PARAMS) as rd:  # and a run resuming after a merge appends to the new file
        rd.append(rec(2))
    assert [r["condition_id"] for r in R.load_results(tmp_path)] == [0, 1, 2]


def test_another_runs_part_parameters_left_behind_do_not_refuse_this_runs_part(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with R.ResultsDir(b, {**PARAMS, "alpha": 0.2}, shard=R.ShardSpec(1, 2)) as rd:
        rd.append(rec(1))
    with R.ResultsDir(a, PARAMS, shard=R.ShardSpec(0, 2)) as rd:
        rd.append(rec(0))
    for name in ("results.part1-of-2.jsonl", "results.part1-of-2.params.json"):
        shutil.copy(b / "parts" / name, a / "parts" / name)
    with pytest.raises(ValueError, match=r"part1-of-2\.jsonl was written by another run"):
        R.merge_parts(a)
    # the user moves the part out, as the refusal says, and runs that part here: its records are this run's
    (a / "parts" / "results.part1-of-2.jsonl").rename(tmp_path / "theirs.jsonl")
    with R.ResultsDir(a, PARAMS, shard=R.ShardSpec(1, 2)) as rd:
        rd.append(rec(1))
    assert [r["condition_id"] for r in R.merge_parts(a)] == [0, 1]
    assert R.load_params(a) == R.read_json_file(a / "parts" / "results.part1-of-2.params.json")["params"]


@pytest.mark.parametrize("cid", [None, "1", 1.0, True, -1])
def test_a_record_whose_condition_id_is_no_index_is_corruption_named_by_file_and_line(tmp_path, cid):
    # read as it was: int(None) failed in load_results naming no file, "1" / 1.0 / True passed for id 1
    with R.ResultsDir(tmp_path, PARAMS) as rd:
        rd.append(rec(0))
    path = tmp_path / "results.jsonl"
    path.write_bytes(
        path.read_bytes() + R.encode_record({**rec(1), "condition_id": cid}) + R.encode_record(rec(2))
    )
    with pytest.raises(
        ValueError, match=r"results\.jsonl: line 2 is not a valid results record \(condition_id"
    ):
        R.load_results(tmp_path)


def test_parts_gathered_into_a_new_folder_bring_their_parameters(tmp_path):
    # the multi-node recipe without a shared filesystem gathers each node's parts/ into one folder: a new
    # folder has no params.json, and `memcore merge` refused it although every part carries its run's
    nodes = []
    for i, (part, params) in enumerate(((0, PARAMS), (1, PARAMS), (1, {**PARAMS, "alpha": 0.2}))):
        d = tmp_path / f"node{i}"
        with R.ResultsDir(d, params, shard=R.ShardSpec(part, 2)) as rd:
            rd.append(rec(part))
        nodes.append(d)
    new = tmp_path / "new"
    for d in nodes[:2]:
        shutil.copytree(d / "parts", new / "parts", dirs_exist_ok=True)
    assert not (new / "params.json").exists() and R.adopt_part_params(new)
    assert R.load_params(new) == R.load_params(nodes[0])
    assert [r["condition_id"] for r in R.merge_parts(new)] == [0, 1]
    assert not R.adopt_part_params(new)  # it has its params.json now
    other = tmp_path / "other"
    shutil.copytree(nodes[0] / "parts", other / "parts")
    shutil.copytree(nodes[2] / "parts", other / "parts", dirs_exist_ok=True)  # part 1 of another run
    with pytest.raises(ValueError, match=r"parts were written by different runs: alpha"):
        R.adopt_part_params(other)
    assert not (other / "params.json").exists()


@pytest.mark.parametrize("name", ["summary.json", "report.html", "nn_extraction.json"])
def test_a_folder_of_another_tools_summary_or_report_is_refused(tmp_path, name):
    # a run replaces these at its end: opened as a new results directory, another tool's file was lost
    (tmp_path / name).write_text("theirs")
    with pytest.raises(ValueError, match=f"holds {name} but no params.json: not a memcore results directory"):
        R.ResultsDir(tmp_path, PARAMS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    assert (tmp_path / name).read_text() == "theirs"
