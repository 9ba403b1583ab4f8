"""The ``memcore`` command line.

    memcore extract --model DIR (--prompts FILE | --classes 0,1,... | --unconditional) \\
                    --num-per-condition N [--train DATA] --out DIR [--dry-run] [--shard i/n]
    memcore demo [--out ./memcore-demo]
    memcore profile --model DIR (...) --out DIR      short calibration, per-stage cost, projected GPU-hours
    memcore merge DIR                                merge shard/rank parts, rewrite summary + report
    memcore report DIR                               rebuild report.html
    memcore bench [--quick] [NAME ...]               run benchmarks/bench_*.py
    memcore train-demo --out DIR                     retrain the bundled demo model

Several GPUs on a node: ``torchrun --standalone --nproc-per-node=8 -m memcore extract ... --out DIR``;
several nodes: see :mod:`memcore.io.results`.

Errors in the input (missing paths, corrupt files, wrong image sizes, empty prompt files, non-UTF-8 text,
grids that do not divide, parameters that differ from the ones a results directory was started with) are
reported in one line, ``memcore: error: ...``, with exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2


class _CliError(Exception):
    pass


class OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors in one line, like memcore's own (argparse prints the whole usage first)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _grid(text: str) -> tuple[int, int]:
    t = text.lower().replace("×", "x")
    parts = t.split("x") if "x" in t else t.split(",")
    try:
        g = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must look like 4x4, got {text!r}") from None
    if len(g) == 1:
        g = (g[0], g[0])
    if len(g) != 2 or min(g) < 1:
        raise argparse.ArgumentTypeError(f"grid must be two positive integers like 4x4, got {text!r}")
    return g  # type: ignore[return-value]


def _add_attack_args(p: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    from memcore.attacks.carlini import DTYPES, SAMPLERS, ExtractConfig
    from memcore.graph import DEFAULT_NODE_BUDGET
    from memcore.ops._backend import BACKENDS
    from memcore.sampling.engine import ATTENTION_BACKENDS, MODES

    d = ExtractConfig()
    p.add_argument("--model", required=model_required, help="local diffusers model or pipeline directory")
    src = p.add_mutually_exclusive_group(required=model_required)
    src.add_argument("--prompts", help="prompts: .txt (one per line), .jsonl or .csv (see --column)")
    src.add_argument("--classes", help="class ids of a class-conditional UNet, e.g. 0,1,5-7")
    src.add_argument("--unconditional", action="store_true", help="unconditional model: one empty condition")
    p.add_argument("--column", help="field of a .jsonl / column of a .csv prompt file")
    p.add_argument(
        "--num-per-condition",
        "-n",
        type=int,
        default=d.num_per_condition,
        help="candidates per condition",
    )
    p.add_argument("--train", help="training images (folder, .npz/.npy, .safetensors): enables verification")
    p.add_argument("--steps", type=int, default=d.num_inference_steps, help="DDIM steps")
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance of text models (default 7.5; unused otherwise)",
    )
    p.add_argument("--eta", type=float, default=d.eta, help="DDIM eta")
    p.add_argument("--alpha", type=float, default=d.alpha, help="tiled-L2 edge threshold")
    p.add_argument("--grid", type=_grid, default=d.grid, help="tiled-L2 grid rows x cols (default 4x4)")
    p.add_argument("--min-clique", type=int, default=d.min_clique, help="flag at this clique size")
    p.add_argument("--delta", type=float, default=d.delta, help="verification L2 threshold")
    p.add_argument("--nn-k", type=int, default=d.nn_k, help="NN extraction: neighbours")
    p.add_argument("--nn-alpha", type=float, default=d.nn_alpha, help="NN extraction: ratio alpha")
    p.add_argument(
        "--nn-candidates",
        type=int,
        default=None,
        help="NN extraction: candidates (default --num-per-condition)",
    )
    p.add_argument(
        "--seed", type=int, default=d.seed, help="base seed (candidate i of condition g: seed+g*N+i)"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="micro-batch the model runs at (default min(N, 64))"
    )
    p.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default=d.sampler,
        help="memcore's engine or the plain diffusers loop (reference path)",
    )
    p.add_argument("--mode", default=d.mode, choices=MODES, help="sampling arithmetic")
    p.add_argument(
        "--backend",
        default=d.backend,
        choices=BACKENDS,
        help="backend of the distance, clique and sampling-step ops (auto: the fastest for the device)",
    )
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="model dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (one-time compile cost)")
    p.add_argument(
        "--compile-mode",
        default=d.compile_mode,
        choices=("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"),
        help="torch.compile mode (the last two are refused with the engine's CUDA graphs)",
    )
    p.add_argument("--fuse-norm", action="store_true", help="fused GroupNorm+SiLU kernel in the UNet (CUDA)")
    p.add_argument(
        "--fuse-qkv",
        action="store_true",
        help="one GEMM for each attention's Q/K/V projections (text-to-image pipelines; may change last bits)",
    )
    p.add_argument(
        "--attention",
        default=d.attention,
        choices=ATTENTION_BACKENDS,
        help="attention kernel the UNet tries first (auto: PyTorch's choice; others may change last bits)",
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK under torchrun)"
    )
    p.add_argument(
        "--clique-budget",
        type=int,
        default=None,
        help=f"clique search node budget (default: the engine's, {DEFAULT_NODE_BUDGET:,} branch-and-bound "
        "nodes); a condition whose search hits it is recorded with clique_exact false",
    )
    p.add_argument(
        "--save-images",
        choices=("none", "flagged", "all"),
        default=d.save_images,
        help="PNG pairs for flagged/extracted conditions (default), all, or none",
    )
    p.add_argument("--max-nn-images", type=int, default=d.max_nn_images, help="PNG pairs of NN extractions")
    p.add_argument("--slots", type=int, default=d.slots, help="condition buffers on the device")
    p.add_argument(
        "--train-chunk",
        type=int,
        default=None,
        help="training images on the device at once (default: the whole set when it fits 8 GiB and a quarter "
        "of the free device memory, else streamed in chunks)",
    )
    p.add_argument(
        "--nn-checkpoint-s",
        type=float,
        default=d.nn_checkpoint_s,
        help="NN extraction: checkpoint its state at most every this many seconds",
    )


def _config_from(args: argparse.Namespace, **over):
    from memcore.attacks.carlini import ExtractConfig

    kw = dict(
        num_per_condition=args.num_per_condition,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        eta=args.eta,
        alpha=args.alpha,
        grid=tuple(args.grid),
        min_clique=args.min_clique,
        delta=args.delta,
        nn_k=args.nn_k,
        nn_alpha=args.nn_alpha,
        nn_candidates=args.nn_candidates,
        seed=args.seed,
        batch_size=args.batch_size,
        sampler=args.sampler,
        mode=args.mode,
        backend=args.backend,
        dtype=args.dtype,
        compile=args.compile,
        compile_mode=args.compile_mode,
        fuse_norm=args.fuse_norm,
        fuse_qkv=args.fuse_qkv,
        attention=args.attention,
        clique_budget=args.clique_budget,
        save_images=args.save_images,
        max_nn_images=args.max_nn_images,
        slots=args.slots,
        nn_checkpoint_s=args.nn_checkpoint_s,
        train_chunk=args.train_chunk,
    )
    kw.update(over)
    return ExtractConfig(**kw)


def _conditions_from(args: argparse.Namespace) -> list | None:
    from memcore.io.prompts import load_conditions, parse_classes

    if args.column is not None and args.prompts is None:  # it would be ignored silently
        raise _CliError("--column only applies to --prompts (the field or column of a .jsonl or .csv file)")
    if args.prompts is not None:
        return load_conditions(args.prompts, column=args.column)
    if args.classes is not None:  # "" too: parse_classes says the list is empty
        return parse_classes(args.classes)
    return None


def _device_from(args: argparse.Namespace) -> str | None:
    if args.device:
        return args.device
    from memcore.io.results import local_rank_from_env

    lr = local_rank_from_env()
    if lr is not None:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{lr}"
    return None


def _check_paths(args: argparse.Namespace) -> None:
    if getattr(args, "model", None) and not Path(args.model).exists():
        raise _CliError(f"--model {args.model}: no such file or directory (memcore never downloads models)")
    for name in ("prompts", "train"):
        v = getattr(args, name, None)
        if v and not Path(v).exists():
            raise _CliError(f"--{name} {v}: no such file or directory")


def _check_out(out: str) -> None:
    from memcore.io.results import check_out_dir

    check_out_dir(out)


# ------------------------------------------------------------------------------------------------- extract
#: The flags of the dry run's cost projection, by the argparse names they set.
_COST_FLAGS = {"--throughput": "throughput", "--peak-tflops": "peak_tflops", "--utilisation": "utilisation"}


def _cmd_extract(args: argparse.Namespace) -> int:
    from memcore.attacks import carlini
    from memcore.io.results import parse_shard, shard_from_env

    _check_paths(args)
    _check_out(args.out)
    given = [f for f, v in _COST_FLAGS.items() if getattr(args, v) is not None]
    if given and not args.dry_run:  # a run measures its own cost: these would be ignored silently
        raise _CliError(f"{' and '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} to --dry-run")
    if args.throughput is not None and (args.peak_tflops is not None or args.utilisation is not None):
        raise _CliError(
            "--peak-tflops and --utilisation project from FLOPs; --throughput replaces them: give one"
        )
    config = _config_from(args)
    conditions = _conditions_from(args)
    device = _device_from(args)
    shard = shard_from_env()
    if args.shard is not None:  # "" too: parse_shard says what a shard looks like
        shard = parse_shard(args.shard).combine(shard)
    if args.dry_run:
        return _dry_run(args, config, conditions, device, shard)
    t0 = time.perf_counter()
    res = carlini.extract(
        args.model,
        conditions,
        config=config,
        train=args.train,
        out=args.out,
        device=device,
        shard=shard,
        progress=not args.no_progress and sys.stderr.isatty(),
        report=not args.no_report,
    )
    c = res.summary["counts"]
    msg = f"{c['conditions_done']}/{c['conditions_total']} conditions, {c['flagged']} flagged"
    if "extracted" in c:
        msg += f", {c['extracted']} extracted ({c['extractions_at_zero_fp']} at zero false positives)"
    if res.nn is not None:
        msg += f"; NN extraction: {len(res.nn.extracted_train_indices)} training images extracted"
    elif res.summary.get("nn_progress"):
        prog = res.summary["nn_progress"]
        msg += (
            f"; NN extraction: {prog['candidates_done']}/{prog['candidates_total']} candidates folded in so far "
            "(the last part to finish, or `memcore merge`, completes it)"
        )
    print(f"memcore extract: {msg} in {time.perf_counter() - t0:.1f}s -> {args.out}")
    return 0


def _dry_run(args, config, conditions, device, shard) -> int:
    from memcore.attacks import carlini
    from memcore.attacks.cost import project, unet_flops
    from memcore.utils.device import resolve_device

    dev = resolve_device(device)
    m = carlini._load_model(args.model, config, dev)
    conds = carlini._conditions_for(m, carlini._conditions_arg(conditions))
    # what the run would refuse at once, refused here too (the training data is not read: it may be large)
    carlini._check_fit(m, config)
    flops = unet_flops(m.handle)
    extra = 0
    if m.kind == "unet" and args.train:
        extra = max(0, (config.nn_candidates or config.num_per_condition) - config.num_per_condition)
    proj = project(
        flops,
        conditions=len(conds),
        per_condition=config.num_per_condition,
        steps=config.num_inference_steps,
        cfg=(carlini._guidance(m.kind, config) or 0) > 1,  # diffusers' rule: CFG runs only above 1
        throughput=args.throughput,
        peak_tflops=args.peak_tflops,
        utilisation=0.5 if args.utilisation is None else args.utilisation,
        micro_batch=config.micro_batch,
        extra_candidates=extra,
    )
    print("memcore extract --dry-run: nothing is generated or written")
    if shard.count > 1:  # the projection is of the run the parts make together
        print(
            f"  (the whole run: all {shard.count} parts; part {shard.index} runs about 1/{shard.count} of it)"
        )
    for line in proj.lines():
        print("  " + line)
    return 0


# ---------------------------------------------------------------------------------------------------- demo
def _cmd_demo(args: argparse.Namespace) -> int:
    from memcore.attacks.demo import run_demo

    _check_out(args.out)
    rep = run_demo(
        args.out,
        num_per_condition=args.num_per_condition,
        nn_candidates=args.nn_candidates,
        steps=args.steps,
        device=args.device or "cpu",
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    for line in rep.lines():
        print(line)
    return 0


# ------------------------------------------------------------------------------------------------- profile
def _cmd_profile(args: argparse.Namespace) -> int:
    from memcore.attacks.profile import run_profile

    _check_paths(args)
    _check_out(args.out)  # before the calibration, not after it
    config = _config_from(args)
    conditions = _conditions_from(args)
    prof = run_profile(
        args.model,
        conditions,
        config=config,
        device=_device_from(args),
        calib_conditions=args.calib_conditions,
        calib_n=args.calib_n,
        train=args.train,
    )
    out = Path(args.out)
    from memcore.io.results import atomic_write_json

    atomic_write_json(out / "profile.json", prof)
    for line in prof["lines"]:
        print(line)
    print(f"wrote {out / 'profile.json'}")
    return 0


# ------------------------------------------------------------------------------------------ merge / report
def _results_dir_arg(path: str) -> None:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise _CliError(f"{path} is a file, not a results directory")
    if not p.is_dir():
        raise _CliError(f"{path}: no such results directory")


def _cmd_merge(args: argparse.Namespace) -> int:
    from memcore.attacks.carlini import summarize_dir

    _results_dir_arg(args.dir)
    s = summarize_dir(args.dir, merge=True, report=not args.no_report)
    c = s["counts"]
    print(f"memcore merge: {c['conditions_done']}/{c['conditions_total']} conditions, {c['flagged']} flagged")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from memcore.attacks.carlini import summarize_dir

    _results_dir_arg(args.dir)
    summarize_dir(args.dir, merge=False, report=True)
    print(f"wrote {Path(args.dir) / 'report.html'}")
    return 0


# --------------------------------------------------------------------------------------------------- bench
def _bench_dir() -> Path:
    # The scripts ship with the source checkout, not the wheel: look in the working directory and its
    # parents (e.g. run from tests/), then next to the package (an in-place or editable build).
    cwd = Path.cwd().resolve()
    for base in (cwd, *cwd.parents, Path(__file__).resolve().parents[1]):
        if (base / "benchmarks" / "_common.py").is_file():
            return base / "benchmarks"
    raise _CliError("benchmarks/ not found: run `memcore bench` from a memcore source checkout")


def _cmd_bench(args: argparse.Namespace) -> int:
    bdir = _bench_dir()
    scripts = sorted(bdir.glob("bench_*.py"))
    if args.names:
        want = {n.removeprefix("bench_").removesuffix(".py") for n in args.names}
        unknown = want - {s.stem.removeprefix("bench_") for s in scripts}
        if unknown:
            raise _CliError(f"unknown benchmark(s) {sorted(unknown)}; have {[s.stem for s in scripts]}")
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in want]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(bdir.parent), os.environ.get("PYTHONPATH", "")])}
    if args.out is not None:
        _check_out(args.out)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        env["MEMCORE_BENCH_RESULTS"] = str(Path(args.out).resolve())  # benchmarks/_common.RESULTS
    status = 0
    for s in scripts:
        cmd = [sys.executable, str(s)] + (["--quick"] if args.quick else [])
        print(f"== {' '.join(cmd)}", flush=True)
        rc = subprocess.run(cmd, env=env, cwd=bdir.parent).returncode
        if rc:
            print(f"memcore bench: {s.name} failed with status {rc}", file=sys.stderr)
            status = 1
    return status


def _cmd_train_demo(argv: Sequence[str]) -> int:
    from memcore.models.train_demo import main as train_main

    return int(train_main(list(argv)) or 0)


# ---------------------------------------------------------------------------------------------------- main
class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Show an option's default unless its help already says it, or it has none worth showing (None, a flag
    that is off): "(default 500) (default: 500)" and "(default: None)" only add noise."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from memcore import __version__

    ap = OneLineParser(prog="memcore", description="Audit diffusion models for memorized training data.")
    ap.add_argument("--version", action="version", version=f"memcore {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")  # none given: refused in _main, naming them

    ex = sub.add_parser(
        "extract",
        help="Carlini et al. 2023 extraction (generate-and-filter, NN extraction)",
        formatter_class=_Defaults,
    )
    _add_attack_args(ex)
    ex.add_argument("--out", required=True, help="results directory (resumed when it exists)")
    ex.add_argument("--shard", help="run part i of n of the conditions (i/n); combine with `memcore merge`")
    ex.add_argument("--dry-run", action="store_true", help="print the projected cost and exit")
    ex.add_argument(
        "--throughput",
        type=float,
        default=None,
        help="images sampled/s for --dry-run's GPU-hours, as `memcore profile` measures it (valid for the "
        "same steps, guidance, micro-batch, dtype and device)",
    )
    ex.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak TFLOP/s for --dry-run's GPU-hours without --throughput (default: an H100 SXM's "
        "dense peak in the model's dtype, 989.4 for bfloat16/float16)",
    )
    ex.add_argument(
        "--utilisation",
        type=float,
        default=None,
        help="the share of the peak --dry-run assumes is reached, in (0, 1] (default 0.5)",
    )
    ex.add_argument("--no-progress", action="store_true")
    ex.add_argument("--no-report", action="store_true", help="skip report.html")
    ex.set_defaults(fn=_cmd_extract)

    de = sub.add_parser("demo", help="run the attack on the bundled demo model (CPU, minutes)")
    de.add_argument(
        "--out",
        default="./memcore-demo",
        help="output folder: new, empty or an earlier demo's (resumed) (default ./memcore-demo)",
    )
    de.add_argument("--num-per-condition", "-n", type=int, default=None, help="default: the demo's own (100)")
    de.add_argument("--nn-candidates", type=int, default=None, help="default: the demo's own (500)")
    de.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50)")
    de.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default cpu)")
    de.add_argument("--no-progress", action="store_true")
    de.set_defaults(fn=_cmd_demo)

    pr = sub.add_parser(
        "profile", help="short calibration: per-stage cost and projected GPU-hours", formatter_class=_Defaults
    )
    _add_attack_args(pr)
    pr.add_argument("--out", required=True, help="folder for profile.json")
    pr.add_argument("--calib-conditions", type=int, default=2, help="conditions of the calibration run")
    pr.add_argument("--calib-n", type=int, default=32, help="candidates per condition in the calibration run")
    pr.set_defaults(fn=_cmd_profile)

    me = sub.add_parser("merge", help="merge shard/rank parts of a results directory")
    me.add_argument("dir")
    me.add_argument("--no-report", action="store_true")
    me.set_defaults(fn=_cmd_merge)

    rp = sub.add_parser("report", help="rebuild report.html of a results directory")
    rp.add_argument("dir")
    rp.set_defaults(fn=_cmd_report)

    be = sub.add_parser("bench", help="run the benchmark scripts (benchmarks/bench_*.py)")
    be.add_argument("names", nargs="*", help="e.g. extract distance (default: all)")
    be.add_argument("--quick", action="store_true", help="small sizes (CPU)")
    be.add_argument(
        "--out",
        default=None,
        help="folder for the CSVs (default: the checkout's benchmarks/results/, whose committed CSVs a run "
        "replaces)",
    )
    be.set_defaults(fn=_cmd_bench)

    sub.add_parser(
        "train-demo", help="retrain the bundled demo model (memcore train-demo --help)", add_help=False
    )
    ap.set_defaults(commands=list(sub.choices))
    return ap


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """memcore's own notices (UserWarning) as one line, like its errors; others as Python prints them."""
    if issubclass(category, UserWarning):
        return f"memcore: warning: {' '.join(str(message).split())}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.strerror}: {os.fsdecode(exc.filename)}"  # without the "[Errno 13]" prefix
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _is_out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: MemoryError, torch's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    import torch

    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):  # torch.OutOfMemoryError from 2.5 only
        return True
    return "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower()


def main(argv: Sequence[str] | None = None) -> int:
    previous, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        return _main(argv)
    finally:  # main() is also called in-process (tests, tools): leave Python's formatting as it was
        warnings.formatwarning = previous


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train-demo":  # its own parser; the same one-line errors
        run = lambda: _cmd_train_demo(argv[1:])  # noqa: E731
    else:
        ap = build_parser()
        args = ap.parse_args(argv)
        if args.cmd is None:
            ap.error(f"no command given; choose one of {', '.join(args.commands)}")
        run = lambda: args.fn(args)  # noqa: E731
    try:
        return int(run() or 0)
    except (_CliError, ValueError, TypeError, OSError, UnicodeDecodeError) as exc:
        # OSError: a path the user gave that cannot be read or written (permissions, a file where a
        # directory is needed, ...): one line naming it, like every other bad input
        if os.environ.get("MEMCORE_DEBUG"):  # full traceback for developers
            raise
        print(f"memcore: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (MemoryError, RuntimeError) as exc:
        if os.environ.get("MEMCORE_DEBUG") or not _is_out_of_memory(exc):
            raise
        print(
            f"memcore: error: out of memory ({_one_line(exc)[:200]}); lower --num-per-condition, "
            "--batch-size or --slots, or use a machine with more memory (MEMCORE_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            "memcore: interrupted; finished conditions are saved, re-run the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
