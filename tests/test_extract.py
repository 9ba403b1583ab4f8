"""Carlini extraction end to end on tiny random models: memcore's engine path against the reference path
(diffusers loop + naive torch distances + networkx), resume, shards, NN extraction."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from memcore.attacks import carlini
from memcore.attacks.reference import (
    load_reference_model,
    reference_condition,
    reference_generate,
    reference_nn_extraction,
)
from memcore.io import results as R

GRID = (2, 2)


def tiny_unet(num_classes: int | None, seed: int = 0):
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_classes,
    ).eval()
    # predict x0 directly and damp the output layer: candidates land close to each other, so the threshold
    # graphs hold non-trivial cliques at the alphas below (a random eps-model gives only isolated vertices)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.2)
    return unet, DDIMScheduler(num_train_timesteps=100, prediction_type="sample", clip_sample=False)


@pytest.fixture(scope="module")
def class_model():
    return tiny_unet(3)


def cfg(**kw) -> carlini.ExtractConfig:
    base = dict(
        num_per_condition=12, num_inference_steps=3, alpha=0.02, grid=GRID, min_clique=4, batch_size=5
    )
    base.update(kw)
    return carlini.ExtractConfig(**base)


def reference_run(model, conditions, config, train):
    rm = load_reference_model(model)
    recs = []
    for g, c in enumerate(conditions):
        seeds = [config.seed_of(g, i) for i in range(config.num_per_condition)]
        imgs = torch.cat(
            [
                reference_generate(
                    rm,
                    seeds[i : i + config.micro_batch],
                    [c] * len(seeds[i : i + config.micro_batch]),
                    num_inference_steps=config.num_inference_steps,
                )
                for i in range(0, len(seeds), config.micro_batch)
            ]
        )
        recs.append(
            reference_condition(
                imgs,
                alpha=config.alpha,
                grid=config.grid,
                min_clique=config.min_clique,
                train=train,
                delta=config.delta,
                condition_id=g,
            )
        )
    return recs


def test_engine_agrees_with_reference_path(class_model, tmp_path):
    conditions = [0, 1, 2]
    config = cfg()
    # training set: random digits-like noise plus one generated image, so that a verification hits
    rm = load_reference_model(class_model)
    planted = reference_generate(rm, [config.seed_of(1, 3)], [1], num_inference_steps=3)
    train = torch.cat([torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8), planted])
    res = carlini.extract(
        class_model, conditions, config=config, train=train, out=tmp_path / "run", device="cpu"
    )
    ref = reference_run(class_model, conditions, config, train)
    assert [r.flagged for r in res.conditions] == [r.flagged for r in ref]
    assert any(r.flagged for r in ref) and not all(r.clique_size == config.num_per_condition for r in ref)
    for a, b in zip(res.conditions, ref):
        assert a.clique_size == b.clique_size
        assert a.clique_members == b.members
        assert a.medoid_index == b.medoid_index
        assert a.medoid_seed == config.seed_of(a.condition_id, b.medoid_index)
        assert a.nearest_train_index == b.nearest_train_index
        assert a.extracted == b.extracted and a.eidetic_count == b.eidetic_count
        if b.mean_clique_distance is None:
            assert a.mean_clique_distance is None
        else:
            assert a.mean_clique_distance == pytest.approx(b.mean_clique_distance, rel=1e-5, abs=1e-6)
    # SPEC §7 record fields and summary
    rec = R.load_results(tmp_path / "run")[0]
    for k in (
        "condition",
        "flagged",
        "clique_size",
        "medoid_seed",
        "mean_clique_distance",
        "nearest_train_index",
        "nearest_train_distance",
        "extracted",
        "eidetic_count",
    ):
        assert k in rec
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["counts"]["conditions_done"] == 3
    assert summary["params"]["alpha"] == config.alpha
    html = (tmp_path / "run" / "report.html").read_text()
    assert "<svg" in html and "Ranked conditions" in html
    # nested parameters by dotted key, whole (not one JSON object cut at 120 characters)
    sha = summary["params"]["train"]["sha256"]
    assert f"<th>train.sha256</th><td>{sha}</td>" in html and "<th>scheduler.timestep_spacing</th>" in html


def test_reference_sampler_equals_engine_sampler(class_model, tmp_path):
    a = carlini.extract(class_model, [0, 2], config=cfg(sampler="reference"), device="cpu")
    b = carlini.extract(class_model, [0, 2], config=cfg(sampler="memcore"), device="cpu")
    assert [r.to_record() for r in a.conditions] == [r.to_record() for r in b.conditions]


def test_resume_after_interruption_equals_uninterrupted(class_model, tmp_path):
    config = cfg()
    full = carlini.extract(class_model, [0, 1, 2], config=config, out=tmp_path / "full", device="cpu")
    # interrupted: stop after the first finished condition (what a kill between conditions leaves) ...
    it = carlini.iter_extract(class_model, [0, 1, 2], config=config, out=tmp_path / "cut", device="cpu")
    next(it)
    it.close()
    # ... and a kill -9 in the middle of writing the next record (a torn line)
    path = tmp_path / "cut" / "results.jsonl"
    torn = R.encode_record(full.conditions[1].to_record())
    with open(path, "ab") as f:
        f.write(torn[: len(torn) // 3])
    assert len(R.load_results(tmp_path / "cut")) == 1
    resumed = carlini.extract(class_model, [0, 1, 2], config=config, out=tmp_path / "cut", device="cpu")
    assert R.load_results(tmp_path / "cut") == R.load_results(tmp_path / "full")
    assert [r.to_record() for r in resumed.conditions] == [r.to_record() for r in full.conditions]
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and len({json.loads(x)["condition_id"] for x in lines}) == 3


def test_changed_parameters_are_refused(class_model, tmp_path):
    carlini.extract(class_model, [0], config=cfg(), out=tmp_path, device="cpu")
    with pytest.raises(ValueError, match=r"alpha: directory has 0.02, this run has 0.07"):
        carlini.extract(class_model, [0], config=cfg(alpha=0.07), out=tmp_path, device="cpu")
    with pytest.raises(
        ValueError,
        match=r"conditions_sha256 \(the conditions, prompts or class ids in their order\): directory has",
    ):
        carlini.extract(class_model, [1], config=cfg(), out=tmp_path, device="cpu")


def test_other_weights_or_a_rewritten_training_file_are_refused(class_model, tmp_path):
    import numpy as np

    train = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(8))
    np.save(tmp_path / "t.npy", train.numpy())
    out = tmp_path / "o"
    first = carlini.extract(
        class_model, [0, 1], config=cfg(), train=tmp_path / "t.npy", out=out, device="cpu"
    )
    params = json.loads((out / "params.json").read_text())["params"]
    assert params["train"]["sha256"] == carlini._digest(train) and len(params["model_sha256"]) == 64
    lines = (out / "results.jsonl").read_text()
    # same architecture and in-memory description, other weights: the digest tells them apart
    other = tiny_unet(3, seed=1)
    assert carlini._identity(other) == carlini._identity(class_model) == params["model"]
    with pytest.raises(ValueError, match=r"model_sha256 \(the model's weights\): directory has \"[0-9a-f]+"):
        carlini.extract(other, [0, 1], config=cfg(), train=tmp_path / "t.npy", out=out, device="cpu")
    # the training file rewritten in place: same path, same count, other images
    np.save(tmp_path / "t.npy", (255 - train).numpy())
    with pytest.raises(
        ValueError, match=r"results\. train\.sha256 \(the training images\): directory has \"[0-9a-f]+"
    ):
        carlini.extract(class_model, [0, 1], config=cfg(), train=tmp_path / "t.npy", out=out, device="cpu")
    np.save(tmp_path / "t.npy", train.numpy())
    # the scheduler config edited (what DDIM builds from it): another schedule, other images
    unet, sched = class_model
    from diffusers import DDIMScheduler

    edited = (unet, DDIMScheduler.from_config(sched.config, beta_end=0.03))
    with pytest.raises(
        ValueError, match=r"results\. scheduler\.beta_end: directory has 0\.02, this run has 0\.03\. Use"
    ):
        carlini.extract(edited, [0, 1], config=cfg(), train=tmp_path / "t.npy", out=out, device="cpu")
    assert (
        params["scheduler"]["prediction_type"] == "sample"
        and params["scheduler"]["num_train_timesteps"] == 100
    )
    assert (out / "results.jsonl").read_text() == lines
    # a directory started before the digests and the schedule were recorded resumes (and keeps its parameters)
    old = {k: v for k, v in params.items() if k not in ("model_sha256", "scheduler")}
    old["train"] = {k: v for k, v in params["train"].items() if k != "sha256"}
    R.atomic_write_json(
        out / "params.json", {"format": R.FORMAT_VERSION, "fingerprint": R.fingerprint(old), "params": old}
    )
    before = (out / "params.json").read_text()
    with pytest.warns(UserWarning, match="predates them: model_sha256, scheduler, train.sha256$"):
        again = carlini.extract(
            class_model, [0, 1], config=cfg(), train=tmp_path / "t.npy", out=out, device="cpu"
        )
    assert [r.to_record() for r in again.conditions] == [r.to_record() for r in first.conditions]
    assert (out / "params.json").read_text() == before and (out / "results.jsonl").read_text() == lines


def test_schedule_parameters_are_what_ddim_builds_from_the_config(monkeypatch):
    import types

    import numpy as np
    from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

    for sched in (
        PNDMScheduler(beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1),
        DDPMScheduler(variance_type="fixed_large", clip_sample_range=2.0, timestep_spacing="trailing"),
        DDIMScheduler(num_train_timesteps=4, trained_betas=np.array([0.1, 0.2, 0.3, 0.4])),
    ):
        got = carlini._schedule_params(types.SimpleNamespace(handle=types.SimpleNamespace(scheduler=sched)))
        eff = DDIMScheduler.from_config(sched.config).config
        assert set(got) == set(carlini._SCHEDULE_KEYS)
        assert json.dumps(got, sort_keys=True) == json.dumps(
            R._jsonable({k: eff[k] for k in carlini._SCHEDULE_KEYS}), sort_keys=True
        )
    # built once per scheduler (from_config is slow for a per-call cost)
    built = []
    real = DDIMScheduler.from_config.__func__
    monkeypatch.setattr(
        DDIMScheduler, "from_config", classmethod(lambda c, *a, **k: built.append(1) or real(c, *a, **k))
    )
    m = types.SimpleNamespace(handle=types.SimpleNamespace(scheduler=DDIMScheduler()))
    assert carlini._schedule_params(m) == carlini._schedule_params(m) and len(built) == 1
    m.handle.scheduler = DDIMScheduler(beta_end=0.03)
    assert carlini._schedule_params(m)["beta_end"] == 0.03 and len(built) == 2


def test_shards_merge_to_the_single_run(class_model, tmp_path):
    config = cfg()
    single = carlini.extract(class_model, [0, 1, 2], config=config, out=tmp_path / "one", device="cpu")
    for i in range(2):
        carlini.extract(
            class_model, [0, 1, 2], config=config, out=tmp_path / "sh", device="cpu", shard=R.ShardSpec(i, 2)
        )
    merged = R.load_results(tmp_path / "sh")
    assert merged == R.load_results(tmp_path / "one")
    assert (tmp_path / "sh" / "results.jsonl").read_text().count("\n") == 3
    s = carlini.summarize_dir(tmp_path / "sh")
    assert s["counts"]["flagged"] == single.summary["counts"]["flagged"]


def test_nn_extraction_matches_brute_force(tmp_path):
    model = tiny_unet(None, seed=1)
    config = cfg(num_per_condition=8, nn_candidates=23, nn_k=5, batch_size=6)
    rm = load_reference_model(model)
    with pytest.raises(ValueError, match=r"unknown device 'gpu0'"):
        load_reference_model(model, device="gpu0")
    seeds = [config.seed + i for i in range(23)]
    cands = torch.cat(
        [reference_generate(rm, seeds[i : i + 6], None, num_inference_steps=3) for i in range(0, 23, 6)]
    )
    # plant two generated images in a random training set: they must be extracted with their seeds
    train = torch.cat([torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8), cands[[4, 17]]])
    res = carlini.extract(model, None, config=config, train=train, out=tmp_path, device="cpu")
    ref = reference_nn_extraction(cands, seeds, train, k=5, alpha=0.5)
    nn = res.nn
    assert nn is not None and nn.num_candidates == 23
    assert {30, 31} <= set(nn.extracted_train_indices)
    assert dict(zip(nn.extracted_train_indices, nn.seeds)) == {j: s for j, (s, _) in ref.items()}
    for j, r in zip(nn.extracted_train_indices, nn.ratios):
        assert r == pytest.approx(ref[j][1], rel=1e-5, abs=1e-6)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["extracted_train_indices"] == list(nn.extracted_train_indices)
    assert summary["extracted_seeds"] == list(nn.seeds)
    assert (tmp_path / "images").is_dir()
    # the one unconditional condition also went through generate-and-filter, on the first N candidates
    assert len(res.conditions) == 1 and res.conditions[0].num_candidates == 8


def test_config_checks():
    with pytest.raises(ValueError, match="num_per_condition"):
        carlini.ExtractConfig(num_per_condition=0)
    with pytest.raises(ValueError, match="grid"):
        carlini.ExtractConfig(grid=(0, 4))
    with pytest.raises(ValueError, match="alpha"):
        carlini.ExtractConfig(alpha=float("nan"))
    with pytest.raises(ValueError, match="sampler"):
        carlini.ExtractConfig(sampler="x")
    # the sampler's checks run when the config is built, not once a results directory exists
    with pytest.raises(ValueError, match="backend must be one of"):
        carlini.ExtractConfig(backend="gpu")
    with pytest.raises(ValueError, match="mode must be one of"):
        carlini.ExtractConfig(mode="x")
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        carlini.ExtractConfig(eta=1.5)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        carlini.ExtractConfig(eta=2.0, sampler="reference")
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 9223372036854775807\]"):
        carlini.ExtractConfig(seed=2**63)
    with pytest.raises(ValueError, match="grid must be two positive integers"):
        carlini.ExtractConfig(grid=(True, True))
    with pytest.raises(ValueError, match="grid must be two positive integers"):
        carlini.ExtractConfig(grid=4)
    with pytest.raises(TypeError, match="sync_timing must be a bool"):
        carlini.ExtractConfig(sync_timing="no")
    with pytest.raises(ValueError, match=r"delta must be in \[0, 1\] \(distances are on the \[0, 1\] pixel"):
        carlini.ExtractConfig(delta=2)  # marked every condition extracted
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        carlini.ExtractConfig(alpha=5)  # connected every pair
    with pytest.raises(ValueError, match=r"nn_candidates \(2\) must be >= num_per_condition \(4\)"):
        carlini.ExtractConfig(num_per_condition=4, nn_candidates=2)
    c = carlini.ExtractConfig(num_per_condition=10, seed=5)
    assert c.seed_of(2, 3) == 28 and c.micro_batch == 10


def test_bad_inputs_write_nothing(class_model, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ValueError, match="does not divide"):
        carlini.extract(class_model, [0], config=cfg(grid=(3, 3)), out=out, device="cpu")
    with pytest.raises(ValueError, match="shape"):
        carlini.extract(
            class_model,
            [0],
            config=cfg(),
            train=torch.zeros(3, 1, 4, 4, dtype=torch.uint8),
            out=out,
            device="cpu",
        )
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        carlini.extract(class_model, [0], config=cfg(backend="cuda"), out=out, device="cpu")
    with pytest.raises(ValueError, match="fuse_qkv=True needs a UNet with"):
        carlini.extract(class_model, [0], config=cfg(fuse_qkv=True), out=out, device="cpu")
    with pytest.raises(ValueError, match="class id"):
        carlini.extract(class_model, [7], config=cfg(), out=out, device="cpu")
    with pytest.raises(ValueError, match="needs conditions"):
        carlini.extract(class_model, [], config=cfg(), out=out, device="cpu")
    # a bare string is not iterated into characters ("35" as classes 3 and 5), nor a bare id taken
    with pytest.raises(TypeError, match=r"got the string '35': pass \['35'\]"):
        carlini.extract(class_model, "35", config=cfg(), out=out, device="cpu")
    with pytest.raises(TypeError, match=r"conditions must be a sequence .* got int 3"):
        carlini.extract(class_model, 3, config=cfg(), out=out, device="cpu")
    with pytest.raises(TypeError, match="must be 1-D class ids"):
        carlini.extract(class_model, torch.tensor([[1]]), config=cfg(), out=out, device="cpu")
    with pytest.raises(ValueError, match=r"condition 1\.5 is not a class id"):
        carlini.extract(class_model, [1.5], config=cfg(), out=out, device="cpu")
    with pytest.raises(TypeError, match=r"conditions must be a sequence .* got set"):
        carlini.extract(class_model, {0, 1}, config=cfg(), out=out, device="cpu")
    with pytest.raises(ValueError, match="is not a class id"):
        carlini.extract(class_model, ["\u0663"], config=cfg(), out=out, device="cpu")
    with pytest.raises(ValueError, match="condition True is not a class id"):
        carlini.extract(class_model, [True], config=cfg(), out=out, device="cpu")
    # seeds past 2**63 - 1 are refused before the results directory is begun
    with pytest.raises(ValueError, match=r"seeds go up to 9223372036854775826 .* beyond the largest seed"):
        carlini.extract(class_model, [0, 1], config=cfg(seed=2**63 - 1 - 4), out=out, device="cpu")
    assert not out.exists()


def test_a_run_that_cannot_flag_says_so(class_model):
    with pytest.warns(UserWarning, match=r"min_clique \(13\) exceeds num_per_condition \(12\): no condition"):
        carlini.extract(class_model, [0], config=cfg(min_clique=13), device="cpu")


def test_class_ids_may_be_numpy_or_tensor_integers(class_model):
    import numpy as np

    want = [r.to_record() for r in carlini.iter_extract(class_model, [2, 0], config=cfg(), device="cpu")]
    for conds in (np.array([2, 0]), torch.tensor([2, 0]), [np.int64(2), torch.tensor(0)], ("2", "0")):
        got = [r.to_record() for r in carlini.iter_extract(class_model, conds, config=cfg(), device="cpu")]
        assert got == want, conds
        assert all(type(r["condition"]) is int for r in got)


def test_streaming_iterator_yields_records(class_model):
    got = list(carlini.iter_extract(class_model, [2, 0], config=cfg(), device="cpu"))
    assert [r.condition_id for r in got] == [0, 1] and [r.condition for r in got] == [2, 0]
    assert all(isinstance(r, carlini.ConditionResult) for r in got)
    assert dataclasses.asdict(got[0]) == got[0].to_record()


def tiny_sd_pipeline():
    """A tiny random Stable-Diffusion-layout pipeline (same recipe as tests/test_sampling.py)."""
    import sys
    from pathlib import Path

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(Path(__file__).parent))
    from test_sampling import _tiny_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )  # fmt: skip
    te = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=515, eos_token_id=516, pad_token_id=516, hidden_size=16, intermediate_size=24,
            num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=12, vocab_size=517,
        )
    )  # fmt: skip
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=te, tokenizer=_tiny_tokenizer(12), scheduler=sched, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def test_text_model_with_cfg_engine_equals_reference_path(tmp_path):
    pipe = tiny_sd_pipeline()
    prompts = ["abc", "ca ab"]
    config = cfg(
        num_per_condition=6, num_inference_steps=2, batch_size=3, grid=(4, 4), alpha=0.1, min_clique=2
    )
    a = carlini.extract(pipe, prompts, config=config, out=tmp_path, device="cpu")
    b = carlini.extract(pipe, prompts, config=dataclasses.replace(config, sampler="reference"), device="cpu")
    assert [r.to_record() for r in a.conditions] == [r.to_record() for r in b.conditions]
    assert a.summary["params"]["guidance_scale"] == 7.5 and a.conditions[1].condition == "ca ab"
    with pytest.raises(ValueError, match="not a prompt"):
        carlini.extract(pipe, [3], config=config, device="cpu")
    # no UTF-8 writer takes a lone surrogate: refused up front, not when the summary is written after the run
    with pytest.raises(ValueError, match=r"prompt 1 holds an unpaired surrogate \(U\+D800\)"):
        carlini.extract(pipe, ["abc", "ab \ud800"], config=config, device="cpu")
    # the tokenizer is not a weight: the run's token ids pin it (another BPE merge table tokenizes "ab"
    # differently), and an equal tokenizer resumes
    from memcore.models.offline import offline_clip_tokenizer

    assert len(a.summary["params"]["prompt_tokens_sha256"]) == 64
    pipe.tokenizer = offline_clip_tokenizer(12, merges=[("a", "b"), ("ab", "c</w>"), ("c", "a</w>")])
    assert len(carlini.extract(pipe, prompts, config=config, out=tmp_path, device="cpu").conditions) == 2
    pipe.tokenizer = offline_clip_tokenizer(12, merges=[("c", "a</w>")])
    with pytest.raises(
        ValueError, match=r"results\. prompt_tokens_sha256 \(the prompts' token ids\): directory has"
    ):
        carlini.extract(pipe, prompts, config=config, out=tmp_path, device="cpu")


@pytest.mark.parametrize("n, step", [(130, 37), (64, 64), (5, 2), (1, 1)])
def test_incremental_graph_equals_pairwise_bitset(n, step):
    """Row blocks of new batches against all earlier candidates, mirrored from the lower triangle, give the
    bitset of the whole pairwise graph (batch boundaries off the 64-bit word boundaries included)."""
    from memcore.distance import tiled_l2_graph

    g = torch.Generator().manual_seed(n)
    base = torch.randint(0, 256, (3, 1, 8, 8), generator=g, dtype=torch.uint8)
    # near-copies of three images plus noise: a graph with structure
    imgs = base[torch.randint(0, 3, (n,), generator=g)].int() + torch.randint(
        -6, 7, (n, 1, 8, 8), generator=g
    )
    imgs = imgs.clamp(0, 255).to(torch.uint8)
    config = cfg(alpha=0.03, grid=(2, 2))
    rows = torch.zeros((n, -(-n // 64)), dtype=torch.uint64)
    for s0 in range(0, n, step):
        s1 = min(n, s0 + step)
        words = carlini._graph_rows(imgs[s0:s1], imgs[:s1], config)
        rows[s0:s1, : words.shape[1]] = words
    got = carlini._symmetrize(rows, n)
    want = tiled_l2_graph(imgs, 0.03, grid=(2, 2))
    assert torch.equal(got.view(torch.int64), want.view(torch.int64))
    dense = carlini._unpack_bits(got, n)
    assert torch.equal(carlini._pack_bits(dense).view(torch.int64), got.view(torch.int64))
    assert dense.sum() > 0 or n == 1


def test_nn_resume_recomputes_only_what_is_missing(tmp_path):
    model = tiny_unet(None, seed=1)
    config = cfg(num_per_condition=6, nn_candidates=14, nn_k=4, batch_size=5)
    train = torch.randint(
        0, 256, (12, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    first = carlini.extract(model, None, config=config, train=train, out=tmp_path, device="cpu")
    nn_file = tmp_path / "nn_extraction.json"
    before = json.loads(nn_file.read_text())
    nn_file.unlink()  # killed after the clique record, before the NN result was written
    again = carlini.extract(model, None, config=config, train=train, out=tmp_path, device="cpu")
    assert json.loads(nn_file.read_text()) == before
    assert (tmp_path / "results.jsonl").read_text().count("\n") == 1
    assert again.nn == first.nn
    # both finished: a third run does nothing and returns the stored NN result
    third = carlini.extract(model, None, config=config, train=train, out=tmp_path, device="cpu")
    assert third.nn == first.nn


def test_extraction_sampler_is_reused_across_runs(class_model, tmp_path, monkeypatch):
    from memcore.sampling import Sampler

    unet, sched = class_model
    d = tmp_path / "model"
    unet.save_pretrained(d)
    sched.save_pretrained(d)
    config = cfg()
    sampler = carlini.extraction_sampler(d, config, device="cpu")
    built = []
    init = Sampler.__init__
    monkeypatch.setattr(Sampler, "__init__", lambda self, *a, **k: built.append(1) or init(self, *a, **k))
    # two runs on one Sampler build no other: the records equal those of runs given the model itself
    a = carlini.extract(sampler, [0, 2], config=config)
    b = carlini.extract(sampler, [1], config=config, out=tmp_path / "run")
    assert built == []
    direct_a = carlini.extract(d, [0, 2], config=config, device="cpu")
    direct_b = carlini.extract(d, [1], config=config, out=tmp_path / "direct", device="cpu")
    assert len(built) == 2
    assert [r.to_record() for r in a.conditions] == [r.to_record() for r in direct_a.conditions]
    assert [r.to_record() for r in b.conditions] == [r.to_record() for r in direct_b.conditions]
    # the Sampler stands for the directory it was loaded from: a run started with the path resumes with it
    carlini.extract(d, [1, 2], config=config, out=tmp_path / "mixed", device="cpu")
    res = carlini.extract(sampler, [1, 2], config=config, out=tmp_path / "mixed")
    assert len(R.load_results(tmp_path / "mixed")) == 2 and len(res.conditions) == 2


def test_extraction_sampler_mismatches_are_refused(class_model):
    config = cfg()
    sampler = carlini.extraction_sampler(class_model, config, device="cpu")
    with pytest.raises(
        ValueError, match=r"num_inference_steps \(Sampler 3, config 4\); batch_size \(Sampler 5, config 6\)"
    ):
        carlini.extract(sampler, [0], config=cfg(num_inference_steps=4, batch_size=6))
    with pytest.raises(ValueError, match=r"config\.dtype is 'bfloat16'"):
        carlini.extract(sampler, [0], config=cfg(dtype="bfloat16"))
    with pytest.raises(ValueError, match="needs the model itself"):
        carlini.extract(sampler, [0], config=cfg(sampler="reference"))
    with pytest.raises(ValueError, match="runs on meta"):
        carlini.extract(sampler, [0], config=config, device="meta")
    with pytest.raises(TypeError, match="Sampler already"):
        carlini.extraction_sampler(sampler, config)
    with pytest.raises(ValueError, match="builds the memcore engine"):
        carlini.extraction_sampler(class_model, cfg(sampler="reference"))
    # parameters that do not touch sampling may differ
    res = carlini.extract(sampler, [0], config=cfg(alpha=0.05, min_clique=3))
    assert len(res.conditions) == 1


def test_prepared_training_set_is_read_once_and_equals_the_path(class_model, tmp_path, monkeypatch):
    import numpy as np

    from memcore.io import data

    config = cfg(num_per_condition=8, nn_candidates=13, nn_k=4, batch_size=5)
    model = tiny_unet(None, seed=1)
    seeds = [config.seed + i for i in (2, 9)]
    planted = reference_generate(load_reference_model(model), seeds, None, num_inference_steps=3)
    noise = torch.randint(
        0, 256, (18, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    train = torch.cat([noise, planted])  # two candidates to extract: the NN results below are not empty
    path = tmp_path / "train.npy"
    np.save(path, train.numpy())
    opened, hashed = [], []
    real_open, real_digest = data.open_training_set, carlini._digest
    monkeypatch.setattr(data, "open_training_set", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    monkeypatch.setattr(carlini, "_digest", lambda t: hashed.append(1) or real_digest(t))
    prepared = carlini.extraction_training_set(path, config, device="cpu")
    assert len(prepared) == 20 and "whole" in repr(prepared) and opened == [1] and hashed == [1]
    # two runs read and hash nothing again; their records and NN results equal runs given the path
    a = carlini.extract(model, None, config=config, train=prepared)
    b = carlini.extract(model, None, config=config, train=prepared, out=tmp_path / "p")
    assert opened == [1] and hashed == [1]
    direct = carlini.extract(model, None, config=config, train=path, out=tmp_path / "d", device="cpu")
    assert len(opened) == 2 and len(hashed) == 2
    assert set(direct.nn.extracted_train_indices) == {18, 19}
    records = [c.to_record() for c in direct.conditions]
    assert [c.to_record() for c in b.conditions] == records and b.nn == direct.nn
    # without a results directory no PNG pair is written: the record names no image
    assert [{**c.to_record(), "image": None} for c in a.conditions] == [{**r, "image": None} for r in records]
    assert a.nn == dataclasses.replace(direct.nn, images=())
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["extracted_train_indices"] == list(
        direct.nn.extracted_train_indices
    )
    # the prepared set stands for its file: a directory started with the path accepts it (nothing to redo)
    again = carlini.extract(model, None, config=config, train=prepared, out=tmp_path / "d")
    assert again.nn == direct.nn and len(opened) == 2
    # a tensor is hashed once, when prepared, and copied: writing to it later changes nothing
    t = train.clone()
    from_tensor = carlini.extraction_training_set(t, config, device="cpu")
    assert len(hashed) == 3
    t.zero_()
    c = carlini.extract(model, None, config=config, train=from_tensor, out=tmp_path / "t")
    assert len(hashed) == 3
    assert [x.to_record() for x in c.conditions] == records and c.nn == direct.nn
    # and stands for the tensor's bytes: a directory started with an equal tensor resumes with it
    carlini.extract(model, None, config=config, train=train.clone(), out=tmp_path / "t2", device="cpu")
    assert carlini.extract(model, None, config=config, train=from_tensor, out=tmp_path / "t2").nn == c.nn
    # its own images are read-only: written to in place, the set is refused (the digest would lie)
    from_tensor.images[0] ^= 1
    with pytest.raises(ValueError, match="written to since it was prepared; prepare it again"):
        carlini.extract(model, None, config=config, train=from_tensor)
    with pytest.raises(AttributeError):
        from_tensor.images = train


def test_prepared_training_set_streamed_in_chunks_gives_the_same_records(class_model):
    config = cfg()
    train = torch.randint(0, 256, (9, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    whole = carlini.extract(class_model, [0, 1], config=config, train=train, device="cpu")
    prepared = carlini.extraction_training_set(train, cfg(train_chunk=4), device="cpu")
    assert prepared.chunk == 4 and "streamed 4 at a time" in repr(prepared)
    got = carlini.extract(class_model, [0, 1], config=cfg(train_chunk=4), train=prepared)
    assert [c.to_record() for c in got.conditions] == [c.to_record() for c in whole.conditions]
    assert any(c.nearest_train_index is not None for c in got.conditions)


def test_prepared_training_set_mismatches_are_refused(class_model, tmp_path):
    train = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    prepared = carlini.extraction_training_set(train, device="cpu")
    with pytest.raises(ValueError, match="prepared on cpu, but the extraction runs on meta"):
        carlini.extract(class_model, [0], config=cfg(), train=prepared, device="meta")
    with pytest.raises(ValueError, match=r"prepared with train_chunk=None, config.train_chunk is 2"):
        carlini.extract(class_model, [0], config=cfg(train_chunk=2), train=prepared)
    small = carlini.extraction_training_set(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), device="cpu")
    out = tmp_path / "o"
    with pytest.raises(ValueError, match=r"have shape \(1, 4, 4\) but the model generates \(1, 8, 8\)"):
        carlini.extract(class_model, [0], config=cfg(), train=small, out=out)
    assert not out.exists()
    with pytest.raises(TypeError, match="PreparedTrainingSet already"):
        carlini.extraction_training_set(prepared)
    with pytest.raises(ValueError, match=r"must be \[T, C, H, W\]"):
        carlini.extraction_training_set(torch.zeros(8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="hold no images"):
        carlini.extraction_training_set(torch.zeros(0, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN is an error"):
        carlini.extraction_training_set(torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(TypeError, match="got list"):
        carlini.extract(class_model, [0], config=cfg(), train=[1, 2], device="cpu")
    # an explicit train_chunk equal to the prepared one, and other parameters, may be given
    res = carlini.extract(class_model, [0], config=cfg(alpha=0.05), train=prepared)
    assert len(res.conditions) == 1 and res.conditions[0].nearest_train_index is not None


def test_float_training_tensor_reads_as_the_same_array_from_a_file(tmp_path):
    import numpy as np

    # values whose float32 product with 255 lands on a half (0.8058823... -> 205.5 in float32, 205.49999 exact):
    # a tensor must give the bytes the same array saved to .npy gives
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6000, 1, 4, 4, generator=g)
    x[0, 0, 0, 0] = 0.8058823347091675
    x[1, 0, 0, 0] = 0.9862744808197021
    np.save(tmp_path / "x.npy", x.numpy())
    from_file = carlini.extraction_training_set(tmp_path / "x.npy", device="cpu").images
    from_tensor = carlini.extraction_training_set(x, device="cpu").images
    assert from_file[0, 0, 0, 0] == 205 and from_file[1, 0, 0, 0] == 251
    assert torch.equal(from_tensor, from_file)


def test_opened_training_set_stands_for_its_file(class_model, tmp_path):
    import numpy as np

    from memcore.io import open_training_set

    train = torch.randint(0, 256, (9, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    np.save(tmp_path / "t.npy", train.numpy())
    opened = open_training_set(tmp_path / "t.npy")
    by_path = carlini.extract(class_model, [0, 1], config=cfg(), train=tmp_path / "t.npy", out=tmp_path / "a")
    by_set = carlini.extract(class_model, [0, 1], config=cfg(), train=opened, out=tmp_path / "b")
    assert [r.to_record() for r in by_set.conditions] == [r.to_record() for r in by_path.conditions]
    # the same identity as the path: a directory started with the path resumes with the opened set
    assert (tmp_path / "a" / "params.json").read_text() == (tmp_path / "b" / "params.json").read_text()
    assert (
        len(carlini.extract(class_model, [0, 1], config=cfg(), train=opened, out=tmp_path / "a").conditions)
        == 2
    )
    # a channels-last tensor gets a hint; an opened set of the wrong size is refused like its path
    with pytest.raises(ValueError, match=r"have shape \(8, 8, 1\) .* \(channels last\?"):
        carlini.extract(class_model, [0], config=cfg(), train=train.permute(0, 2, 3, 1), device="cpu")
    np.save(tmp_path / "s.npy", torch.zeros(2, 1, 4, 4, dtype=torch.uint8).numpy())
    small = open_training_set(tmp_path / "s.npy")
    with pytest.raises(
        ValueError, match=r"s.npy\) have shape \(1, 4, 4\) but the model generates \(1, 8, 8\)$"
    ):
        carlini.extract(class_model, [0], config=cfg(), train=small, device="cpu")
    with pytest.raises(TypeError, match="got ndarray"):
        carlini.extract(class_model, [0], config=cfg(), train=train.numpy(), device="cpu")


def test_a_run_failing_before_its_first_record_leaves_no_directory(class_model, tmp_path, monkeypatch):
    # e.g. -n too large for memory: refused after params.json was written, the directory then refused the
    # corrected command as "started with different parameters"
    def no_memory(*a, **k):
        raise MemoryError("N x N graph")

    real_slot = carlini._Slot
    monkeypatch.setattr(carlini, "_Slot", no_memory)
    out = tmp_path / "a" / "b"
    with pytest.raises(MemoryError):
        carlini.extract(class_model, [0, 1], config=cfg(), out=out, device="cpu")
    assert not (tmp_path / "a").exists()
    # a directory the user made, holding something else, keeps it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(MemoryError):
        carlini.extract(class_model, [0, 1], config=cfg(), out=tmp_path / "mine", device="cpu")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt", "params.json"]
    # the corrected command runs; a later failure (resume of a finished run) keeps every record
    monkeypatch.setattr(carlini, "_Slot", real_slot)
    first = carlini.extract(class_model, [0, 1], config=cfg(), out=out, device="cpu")
    monkeypatch.setattr(carlini, "_Slot", no_memory)
    with pytest.raises(MemoryError):
        carlini.extract(class_model, [0, 1], config=cfg(), out=out, device="cpu")
    assert len((out / "results.jsonl").read_text().splitlines()) == len(first.conditions) == 2
