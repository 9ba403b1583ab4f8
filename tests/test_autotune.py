"""``backend="auto"`` autotuning among exact uint8 backends (memcore.ops._tune), exercised on the CPU by
letting it tune there (on CUDA it runs by default; floats never tune)."""

from __future__ import annotations

import warnings

import pytest
import torch

import memcore.distance as D
from memcore.ops import _tune
from memcore.ops import distance as _ops


@pytest.fixture
def tune_on_cpu(monkeypatch):
    monkeypatch.setattr(D, "TUNE_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(_tune, "ENABLED", True)
    _tune.reset()
    yield
    _tune.reset()


def _imgs(n, seed, hi=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, hi, (n, 1, 8, 8), dtype=torch.uint8, generator=g)


def test_bucket():
    assert [_tune.bucket(n) for n in (0, 1, 2, 3, 4, 5, 500, 512, 513)] == [1, 1, 2, 4, 4, 8, 512, 512, 1024]


def test_auto_tunes_once_per_shape_class_and_keeps_results(tune_on_cpu):
    a, b = _imgs(9, 0), _imgs(30, 1)
    want = D.tiled_l2(a, b, grid=(2, 2), backend="cpu")
    assert torch.equal(D.tiled_l2(a, b, grid=(2, 2)), want)
    ch = _tune.choices()
    assert len(ch) == 1
    ((key, info),) = ch.items()
    assert key[0] == "matrix" and set(info["seconds"]) == {"cpu", "cublas"}
    assert info["chosen"] in ("cpu", "cublas")
    # same class (sizes round to the same powers of two): no new tuning; another class tunes again
    D.tiled_l2(_imgs(10, 2), _imgs(29, 3), grid=(2, 2))
    assert len(_tune.choices()) == 1
    D.tiled_l2(_imgs(40, 2), b, grid=(2, 2))
    assert len(_tune.choices()) == 2
    d, i = D.knn(a, b, 5)
    wd, wi = D.knn(a, b, 5, backend="cpu")
    assert torch.equal(d, wd) and torch.equal(i, wi)
    g = D.tiled_l2_graph(a, 0.3, b=b, grid=(2, 2))
    assert torch.equal(
        g.view(torch.int64), D.tiled_l2_graph(a, 0.3, b=b, grid=(2, 2), backend="cpu").view(torch.int64)
    )
    assert {k[0] for k in _tune.choices()} == {"matrix", "knn", "graph"}


def test_a_backend_that_disagrees_is_never_chosen(tune_on_cpu, monkeypatch):
    real = _ops._matrix_impl

    def broken(a, b, gh, gw, scale, backend):
        out = real(a, b, gh, gw, scale, backend)
        return out + 1e-3 if backend == "cublas" else out  # a wrong (and, say, faster) kernel

    monkeypatch.setattr(_ops, "_matrix_impl", broken)
    a = _imgs(6, 4)
    with pytest.warns(RuntimeWarning, match="disagrees"):
        out = D.tiled_l2(a, grid=(2, 2))
    assert torch.equal(out, real(a, None, 2, 2, 1.0, "cpu"))
    (info,) = _tune.choices().values()
    assert info["chosen"] == "cpu" and "cublas" not in info["seconds"]


def test_a_backend_that_raises_is_skipped(tune_on_cpu, monkeypatch):
    real = _ops._matrix_impl

    def failing(a, b, gh, gw, scale, backend):
        if backend == "cublas":
            raise RuntimeError("no kernel for this shape")
        return real(a, b, gh, gw, scale, backend)

    monkeypatch.setattr(_ops, "_matrix_impl", failing)
    with pytest.warns(RuntimeWarning, match="failed"):
        D.tiled_l2(_imgs(5, 5), grid=(2, 2))
    (info,) = _tune.choices().values()
    assert info["chosen"] == "cpu"


def test_floats_explicit_backends_and_disabled_do_not_tune(tune_on_cpu, monkeypatch):
    x = _imgs(5, 6)
    D.tiled_l2(x.float() / 255, grid=(2, 2))  # floats: backends differ in their last bits
    D.tiled_l2(x, grid=(2, 2), backend="cpu")  # an explicit choice is kept
    assert _tune.choices() == {}
    monkeypatch.setattr(_tune, "ENABLED", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        D.tiled_l2(x, grid=(2, 2))
    assert _tune.choices() == {}


def test_extraction_summary_lists_the_choices(tune_on_cpu):
    from test_extract import cfg, tiny_unet

    from memcore.attacks import carlini

    res = carlini.extract(tiny_unet(2), [0, 1], config=cfg(num_per_condition=6), device="cpu")
    tuned = res.summary["environment"]["distance_autotune"]
    assert tuned and all(v["chosen"] in ("cpu", "cublas") for v in tuned.values())


def test_nested_tuning_does_not_deadlock(tune_on_cpu):
    """A candidate that tunes inside its own run (the Triton k-NN's filter launch, reached from ``auto``'s
    backend tuning on CUDA) must not wait on the tuning lock its own thread holds."""
    import threading

    inner_calls = []

    def inner(name):
        inner_calls.append(name)
        return torch.zeros(1)

    def outer(name):
        _tune.pick(("inner", name), ["x", "y"], inner, torch.device("cpu"))
        return torch.zeros(1)

    done = threading.Event()
    got = []

    def work():
        got.append(_tune.pick(("outer",), ["a", "b"], outer, torch.device("cpu")))
        done.set()

    threading.Thread(target=work, daemon=True).start()
    assert done.wait(60), "nested autotuning deadlocked"
    assert got[0] in ("a", "b") and set(inner_calls) == {"x", "y"}
    assert ("inner", "a") in _tune.choices() and ("inner", "b") in _tune.choices()


def test_no_tuning_inside_a_cuda_graph_capture(tune_on_cpu, monkeypatch):
    # tuning synchronises the device to time candidates, which breaks a CUDA graph capture: a shape class met
    # first inside one runs the static choice untuned, and is tuned at its first call outside
    a, b = _imgs(9, 0), _imgs(30, 1)
    monkeypatch.setattr(D, "_capturing", lambda device: True)
    assert torch.equal(D.tiled_l2(a, b, grid=(2, 2)), D.tiled_l2(a, b, grid=(2, 2), backend="cpu"))
    assert _tune.choices() == {}
    monkeypatch.setattr(D, "_capturing", lambda device: False)
    D.tiled_l2(a, b, grid=(2, 2))
    assert len(_tune.choices()) == 1


def test_the_static_choice_failing_is_the_calls_error(tune_on_cpu, monkeypatch):
    # it was skipped, and the next candidate, checked against nothing, became the shape class's choice for
    # good (a passing out-of-memory too); with tuning off the call raises: so it does with tuning on
    real = _ops._matrix_impl
    fail = [True]

    def failing(a, b, gh, gw, scale, backend):
        if backend == "cpu" and fail[0]:
            raise MemoryError("out of memory")
        return real(a, b, gh, gw, scale, backend)

    monkeypatch.setattr(_ops, "_matrix_impl", failing)
    with pytest.raises(MemoryError):
        D.tiled_l2(_imgs(5, 5), grid=(2, 2))
    assert _tune.choices() == {}
    fail[0] = False
    D.tiled_l2(_imgs(5, 5), grid=(2, 2))
    assert set(next(iter(_tune.choices().values()))["seconds"]) == {"cpu", "cublas"}


def test_a_cached_choice_not_eligible_for_this_call_is_not_used(tune_on_cpu):
    # the Triton k-NN and pairwise pass only the launch configurations this call's sizes allow; the shape
    # class's cached choice came back even when it was not among them
    key = ("test", 1)
    runs = {"a": lambda: torch.zeros(3), "b": lambda: torch.zeros(3)}
    _tune.pick(key, ["a", "b"], lambda be: runs[be](), torch.device("cpu"), repeats=1)
    chosen = _tune.chosen(key)
    other = "a" if chosen == "b" else "b"
    assert _tune.pick(key, [other, "c"], lambda be: torch.zeros(3), torch.device("cpu")) == other
