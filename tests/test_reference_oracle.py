"""The reference (oracle) extraction path against SPEC §1–§3 and the rules the engines document, with brute
force: a wrong oracle would validate a wrong engine. Each test here failed before the fix it names."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from memcore.attacks import reference as ar
from memcore.reference import distance as ref


def test_reference_medoid_is_the_engines_rule_on_reported_distances():
    # points 1, 2, 0, 4 (times c, on npx equal pixels): the first two tie in the reals (1+1+3 = 1+2+2 units),
    # and the float32 distances memcore reports break the tie one way or the other. The oracle summed float64
    # distances in row order instead, and disagreed with the engine's documented rule (least exact sum of
    # the reported distances, the first on ties).
    import memcore.distance as D
    import memcore.graph as mg

    for npx, c in itertools.product(range(1, 6), range(1, 64)):
        for order in ([0, 1, 2, 3], [1, 0, 2, 3]):
            pts = torch.tensor([1, 2, 0, 4])[order]
            imgs = (pts[:, None] * c).expand(4, npx).to(torch.uint8).reshape(4, 1, 1, npx)
            rec = ar.reference_condition(imgs, alpha=1.0, grid=(1, 1), min_clique=1)
            assert rec.members == (0, 1, 2, 3)
            st = mg.clique_stats(D.tiled_l2(imgs, grid=(1, 1)), list(rec.members))
            assert rec.medoid_index == st.medoid, (npx, c, order)
            assert rec.mean_clique_distance == pytest.approx(st.mean_distance, rel=1e-12)


def test_reference_nn_exact_copy_with_all_of_s_copies_is_extracted():
    # SPEC §3 with every image of S a copy of x: ratio 0 / 0. The engine (memcore.attacks.nn.NNState.update)
    # documents ratio 0 (an exact copy of x extracts it); the oracle dropped the candidate (NaN <= 1 is False).
    train = torch.full((3, 1, 2, 2), 7, dtype=torch.uint8)
    cand = torch.cat(
        [torch.full((1, 1, 2, 2), 7, dtype=torch.uint8), torch.zeros(1, 1, 2, 2, dtype=torch.uint8)]
    )
    got = ar.reference_nn_extraction(cand, [11, 5], train, k=50, alpha=0.5)  # k > 3 training images: S = all
    assert got == {0: (11, 0.0)}
    from memcore.attacks.nn import _ratio
    from memcore.distance import knn

    d, _ = knn(cand, train, 3)
    assert _ratio(d, 0.5).tolist()[0] == 0.0  # the engine's value for the same candidate


def test_reference_distance_refuses_a_grid_that_does_not_divide():
    # SPEC §1: H and W must divide evenly, otherwise a clear error. The oracle silently dropped the remainder
    # rows/cols (3 x 3 tiles of 2 x 2 on an 8 x 8 image) and returned a distance.
    a = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    a[1, 0, 7, 7] = 255  # only in the dropped last row/col: the wrong distance was 0
    for grid in ((3, 3), (3, 2), (2, 3)):
        with pytest.raises(ValueError, match="does not divide"):
            ref.distance_matrix(a, None, grid)
        with pytest.raises(ValueError, match="does not divide"):
            ref.graph(a, None, 0.1, grid)
        with pytest.raises(ValueError, match="does not divide"):
            ref.knn(a, a, 1, grid)


@pytest.fixture(scope="module")
def ddim_pipe():
    from diffusers import DDIMPipeline, DDPMScheduler
    from test_sampling import _unet

    pipe = DDIMPipeline(_unet(), DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_reference_sample_with_eta_is_the_pipeline_per_seed(ddim_pipe):
    # eta > 0: DDIMPipeline(generator=[one per seed]) draws each image's step noise from its own generator;
    # the reference loop drew it from the global RNG, so an image depended on torch's global state (and the
    # extraction's reference sampler could not regenerate a candidate from its seed).
    seeds = [5, 7]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = ddim_pipe(batch_size=2, generator=gens, num_inference_steps=3, eta=1.0, output_type="np").images
    want = torch.from_numpy(np.stack([np.asarray(p) for p in ddim_pipe.numpy_to_pil(out)])).permute(
        0, 3, 1, 2
    )
    torch.manual_seed(1)
    a = ar.reference_sample(ddim_pipe.unet, ddim_pipe.scheduler, seeds, num_inference_steps=3, eta=1.0)
    torch.manual_seed(2)
    b = ar.reference_sample(ddim_pipe.unet, ddim_pipe.scheduler, seeds[1:], num_inference_steps=3, eta=1.0)
    assert torch.equal(a, want)
    assert torch.equal(b[0], a[1])  # alone, later, bit-identical (SPEC §2 step 1)
