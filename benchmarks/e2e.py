"""End-to-end benchmarks: DECO / DETR training steps and inference, stock vs fused kernels, eager vs compiled.

One command runs everything (``python -m benchmarks.e2e --out results.json``):

- ``train_step``: forward, Hungarian matching + set criterion (all auxiliary layers), backward, gradient-norm
  clip 0.1 and an AdamW step (``deco.optim.build_optimizer``'s, as ``deco train`` runs it: parameter groups,
  the fused implementation), on a padded batch of ``--batch`` images whose sizes vary around
  ``--image-size`` (like DETR's 800x1333 batches: the first image fills the canvas, the others are smaller
  and padded; the mask marks the padding). Random weights, synthetic targets (1 to 20 boxes per image).
- ``infer``: the model's forward at batch 1 on a full ``--image-size`` image, under ``torch.no_grad``.

Providers: ``stock-eager`` / ``fused-eager`` (``build_deco(kernels="stock"|"fused")``), ``stock-compile`` /
``fused-compile`` (``torch.compile`` of the model; the loss and matcher stay eager, as the matcher runs SciPy),
``stock-cudagraph`` / ``fused-cudagraph`` (GPU only; inference: the forward captured once in a CUDA graph and
replayed; training: the model's forward and backward captured once each by ``torch.cuda.make_graphed_callables``
and replayed, while the matching and loss, the clip and the optimizer step run eagerly, since the matcher works on
the host), and ``eager`` / ``compile`` / ``cudagraph`` for DETR-R50. Each also with ``-cl``: the model
converted to channels-last (``model.to(memory_format=torch.channels_last)``, as ``deco train --channels-last``
does), so every activation from the first conv on is NHWC. dtypes: ``float32``, or ``bfloat16`` = the model
under ``torch.autocast(bfloat16)``.
Each record holds the median step time (CUDA events, after warm-up), its spread, images/s and the peak of
``torch.cuda.max_memory_allocated`` over the timed steps; ``speedup`` is against the stock providers of
the same model, batch, dtype and pass.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.cases import comma_list
from benchmarks.results import ResultsFile, environment
from benchmarks.timing import capture_graph, measure

__all__ = [
    "MODELS",
    "STEP_PHASES",
    "build_model",
    "build_train_step",
    "graphed_training_runner",
    "main",
    "synthetic_batch",
]

log = logging.getLogger("benchmarks.e2e")

MODELS = ("deco-r18", "deco-r50", "detr-r50")
MODEL_NAMES = {"deco-r18": "DECO-R18", "deco-r50": "DECO-R50", "detr-r50": "DETR-R50"}
CHANNELS_LAST_SUFFIX = "-cl"
_RUNNERS = ("eager", "compile", "cudagraph")
DETR_PROVIDERS = tuple(f"{runner}{layout}" for layout in ("", CHANNELS_LAST_SUFFIX) for runner in _RUNNERS)
DECO_PROVIDERS = tuple(f"{kernels}-{runner}" for runner in DETR_PROVIDERS for kernels in ("stock", "fused"))
STOCK_PROVIDERS = tuple(provider for provider in DECO_PROVIDERS if provider.startswith("stock-"))
# Everything but DETR compiled, which is opt-in (``--providers ...,compile``): compiling DETR-R50 costs minutes
# of device time, and its eager and graphed rows already give the DECO-R50 comparison a baseline.
DEFAULT_PROVIDERS = DECO_PROVIDERS + tuple(p for p in DETR_PROVIDERS if not p.startswith("compile"))
NUM_CLASSES = 91
# A tiny DECO (smoke runs on the CPU): the same code path, a fraction of the work.
_TINY_DECO = dict(
    num_queries=4, query_grid=(2, 2), d_model=32, encoder_dims=(16, 32), encoder_depths=(1, 1), num_decoder_layers=2
)


def provider_parts(provider: str) -> tuple[str | None, str, bool]:
    """(kernels "stock" | "fused", None for DETR; runner "eager" | "compile" | "cudagraph"; channels-last)."""
    channels_last = provider.endswith(CHANNELS_LAST_SUFFIX)
    parts = provider.removesuffix(CHANNELS_LAST_SUFFIX).split("-")
    return (parts[0] if len(parts) == 2 else None), parts[-1], channels_last


def build_model(model: str, provider: str, tiny: bool = False) -> torch.nn.Module:
    """The random-weight model of ``model`` for ``provider`` (not yet compiled), in the provider's memory format."""
    kernels, _, channels_last = provider_parts(provider)
    if model == "detr-r50":
        from deco.models.detr import build_detr

        built = build_detr(NUM_CLASSES)
    else:
        from deco.models.deco import build_deco

        backbone = {"deco-r18": "resnet18", "deco-r50": "resnet50"}[model]
        built = build_deco(backbone, NUM_CLASSES, kernels=kernels, **(_TINY_DECO if tiny else {}))
    return built.to(memory_format=torch.channels_last) if channels_last else built


def synthetic_batch(
    batch: int, image_size: tuple[int, int], device: torch.device, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Images B x 3 x H x W (zero on the padding), mask B x H x W (True = padding) and B targets.

    Image 0 fills H x W; the others cover 75-100 % of each side, like a DETR batch of mixed aspect ratios.
    Targets: 1 to 20 boxes per image, labels in [0, 91), boxes cxcywh inside [0, 1].
    """
    height, width = image_size
    images = torch.zeros(batch, 3, height, width)
    mask = torch.ones(batch, height, width, dtype=torch.bool)
    targets = []
    for index in range(batch):
        if index == 0:
            h, w = height, width
        else:
            h = int(height * (0.75 + 0.25 * torch.rand((), generator=generator)))
            w = int(width * (0.75 + 0.25 * torch.rand((), generator=generator)))
        images[index, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        mask[index, :h, :w] = False
        count = int(torch.randint(1, 21, (), generator=generator))
        size = 0.05 + 0.4 * torch.rand(count, 2, generator=generator)
        centre = size / 2 + (1 - size) * torch.rand(count, 2, generator=generator)
        targets.append(
            {
                "labels": torch.randint(0, NUM_CLASSES, (count,), generator=generator).to(device),
                "boxes": torch.cat([centre, size], dim=1).to(device),
            }
        )
    return images.to(device), mask.to(device), targets


def _autocast(dtype: str, device: torch.device, cache_enabled: bool = True):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)


def _graphed_inference(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor, dtype: str, device):
    """Capture the forward in a CUDA graph once; each replay reruns its kernels without Python or launch
    overhead (inputs stay in the captured buffers, as a serving loop would copy new images into them)."""
    with torch.no_grad(), _autocast(dtype, device, cache_enabled=False):
        return capture_graph(lambda: model(images, mask), device, warmup_runs=3)


def graphed_training_runner(model: torch.nn.Module, images: torch.Tensor, mask: torch.Tensor) -> Callable:
    """The model (in training mode) for a training step whose forward and backward replay CUDA graphs: on the first
    call ``torch.cuda.make_graphed_callables`` warms them up and captures each once for these inputs (under the
    caller's autocast, which must not cache: its weight cache cannot outlive a capture). The loss, its matching
    and the optimizer run eagerly on the replayed outputs and gradients; the batch's shape is fixed, as graphs
    need."""
    graphed = None

    def run(images_: torch.Tensor, mask_: torch.Tensor):
        nonlocal graphed
        if graphed is None:
            # A parameter no loss term reaches (none in DECO or DETR today) gets no gradient, not an error.
            graphed = torch.cuda.make_graphed_callables(model, (images, mask), allow_unused_input=True)
        return graphed(images_, mask_)

    return run


def _peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _row(model_key: str, provider: str, dtype: str, pass_: str, args) -> dict:
    """The fields that identify a record (:func:`benchmarks.results.row_key`)."""
    return {
        "model": MODEL_NAMES[model_key],
        "provider": provider,
        "batch": args.batch if pass_ == "train_step" else 1,
        "image_size": list(args.image_size),
        "dtype": dtype,
        "pass": pass_,
    }


STEP_PHASES = ("forward", "loss", "backward", "optimizer")


def build_train_step(
    model_key: str,
    model: torch.nn.Module,
    runner: Callable,
    batch: tuple[torch.Tensor, torch.Tensor, list[dict]],
    device: torch.device,
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    phase: Callable[[str], contextlib.AbstractContextManager] = lambda name: contextlib.nullcontext(),
) -> Callable[[], None]:
    """One training step of ``model`` (put in train mode) on ``batch`` = (images, mask, targets), as ``deco train``
    runs it: ``runner`` (the model or its compiled form) under ``autocast()``, Hungarian matching and the set
    criterion over every decoder layer, backward, gradient-norm clip 0.1 and ``deco.optim.build_optimizer``'s
    AdamW (for DETR-R50 too: the groups' learning rates do not change the step's cost; the default foreach AdamW
    spent about 7 ms of host time per DECO-R18 step on the H100 machine). ``phase(name)`` wraps each of
    :data:`STEP_PHASES` (the optimizer's ``zero_grad`` in none)."""
    from deco.config import TrainConfig
    from deco.losses import build_criterion
    from deco.optim import build_optimizer

    model.train()
    class_loss = "softmax_ce" if model_key == "detr-r50" else "focal"
    num_layers = len(model.decoder_layers) if model_key == "detr-r50" else model.config["num_decoder_layers"]
    criterion = build_criterion(NUM_CLASSES, num_aux_layers=num_layers - 1, class_loss=class_loss).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, TrainConfig())
    images, mask, targets = batch

    def step():
        with phase("forward"), autocast():
            outputs = runner(images, mask)
        with phase("loss"):
            loss = criterion.total(criterion(outputs, targets))
        optimizer.zero_grad(set_to_none=True)
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(trainable, 0.1)
            optimizer.step()

    return step


def build_step(
    model_key: str, provider: str, dtype: str, pass_: str, args, device: torch.device
) -> tuple[Callable[[object], None], dict]:
    """One (model, provider, dtype, pass) built on ``device``: its step (a training step: forward, loss with
    matching, backward, clipping and AdamW; or one inference) and the fields of its record."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    _, runner_kind, _ = provider_parts(provider)
    model = build_model(model_key, provider, args.smoke).to(device)
    runner = torch.compile(model) if runner_kind == "compile" else model
    row = _row(model_key, provider, dtype, pass_, args)
    batch = row["batch"]
    images, mask, targets = synthetic_batch(batch, tuple(args.image_size), device, generator)

    if pass_ == "train_step":
        graphed = runner_kind == "cudagraph"
        train_step = build_train_step(
            model_key,
            model,
            graphed_training_runner(model, images, mask) if graphed else runner,
            (images, mask, targets),
            device,
            autocast=lambda: _autocast(dtype, device, cache_enabled=not graphed),
        )

        def step(_):
            train_step()

    elif runner_kind == "cudagraph":
        model.eval()
        graph = None

        def step(_):
            nonlocal graph
            if graph is None:
                graph = _graphed_inference(model, images, mask, dtype, device)
            graph.replay()

    else:
        model.eval()

        def step(_):
            with torch.no_grad(), _autocast(dtype, device):
                runner(images, mask)

    return step, row


def run_one(model_key: str, provider: str, dtype: str, pass_: str, args, device: torch.device) -> dict:
    """Build, warm up and time one (model, provider, dtype, pass); returns its record."""
    step, row = build_step(model_key, provider, dtype, pass_, args, device)
    batch = row["batch"]
    started = time.perf_counter()
    step(None)  # first call: compilation, graph capture, cuDNN/Triton autotuning, allocator growth
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    first_s = time.perf_counter() - started
    stats = measure(
        step,
        device=device,
        rep_ms=args.rep_ms,
        warmup_runs=args.warmup,
        min_runs=args.runs,
        max_runs=max(args.runs, 200),
        flush_l2=False,
    )
    record = {
        **row,
        "median_ms": stats.median_ms,
        "p20_ms": stats.p20_ms,
        "p80_ms": stats.p80_ms,
        "runs": stats.runs,
        "images_per_s": batch * 1e3 / stats.median_ms,
        "peak_mem_gb": _peak_memory_gb(device),
        "first_call_s": first_s,
    }
    return record


def release_memory(device: torch.device) -> None:
    # The last model, its graphs and optimizer state are garbage once run_one returned; free them before the next.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="results JSON to write (rewritten after every record)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the records already in --out (same device, torch and triton) and skip their rows",
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list from {MODELS}")
    parser.add_argument(
        "--providers",
        default=",".join(DEFAULT_PROVIDERS),
        help=f"comma list from {DECO_PROVIDERS} (DECO) and {DETR_PROVIDERS} (DETR); each applies where it fits",
    )
    parser.add_argument("--passes", default="train_step,infer", help="comma list from train_step, infer")
    parser.add_argument(
        "--dtypes", default="float32", help="float32 (the training recipe's) and/or bfloat16 (autocast)"
    )
    parser.add_argument("--batch", type=int, default=2, help="training batch (inference always uses 1)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--runs", type=int, default=10, help="timed steps at least")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after the first call")
    parser.add_argument("--rep-ms", type=float, default=1000.0, help="keep timing until this much step time")
    parser.add_argument(
        "--skip-compile-for",
        default="",
        help="comma list of models whose compile providers are skipped (compiling a model takes 20-90 s a row); "
        "default: none. The compiled rows run last and --resume continues a cut-off run, so none is lost",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny DECO variants for a CPU check of the code path")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models, providers, passes, dtypes = (
        comma_list(args.models), comma_list(args.providers), comma_list(args.passes), comma_list(args.dtypes)
    )
    for name, values, allowed in (
        ("--models", models, MODELS),
        ("--providers", providers, DECO_PROVIDERS + DETR_PROVIDERS),
        ("--passes", passes, ("train_step", "infer")),
        ("--dtypes", dtypes, ("float32", "bfloat16")),
    ):
        bad = sorted(set(values) - set(allowed))
        if bad:
            raise SystemExit(f"{name}: unknown {bad}; expected among {allowed}")
    skip_compile = set(comma_list(args.skip_compile_for))
    try:
        results = ResultsFile(args.out, environment(device), STOCK_PROVIDERS, resume=args.resume)
    except ValueError as error:
        raise SystemExit(str(error)) from error

    # Eager runs of every model first (NCHW, then channels-last), compiled ones last: compilation takes minutes,
    # and a run cut off by its time budget should lose the compiled rows rather than the DETR comparison.
    def order(provider: str) -> tuple[bool, bool]:
        _, runner, channels_last = provider_parts(provider)
        return runner == "compile", channels_last

    combinations = [
        (model_key, provider)
        for stage in sorted({order(provider) for provider in providers})
        for model_key in models
        for provider in providers
        if provider in (DETR_PROVIDERS if model_key == "detr-r50" else DECO_PROVIDERS) and order(provider) == stage
    ]
    failures = 0
    for model_key, provider in combinations:
        _, runner, _ = provider_parts(provider)
        if runner == "compile" and model_key in skip_compile:
            log.info("skipping %s %s (--skip-compile-for)", model_key, provider)
            continue
        for pass_ in passes:
            if runner == "cudagraph" and device.type != "cuda":
                log.info("skipping %s %s %s (CUDA graphs need a GPU)", model_key, provider, pass_)
                continue
            for dtype in dtypes:
                if results.measured(_row(model_key, provider, dtype, pass_, args)):
                    log.info("skipping %s %s %s %s (in %s already)", model_key, provider, dtype, pass_, args.out)
                    continue
                try:
                    record = run_one(model_key, provider, dtype, pass_, args, device)
                except Exception:  # one failing combination must not lose the others' numbers
                    failures += 1
                    log.exception("%s %s %s %s failed", model_key, provider, dtype, pass_)
                    continue
                finally:
                    release_memory(device)
                results.add(record)
                log.info(
                    "%s %-18s %-9s %-10s %8.2f ms  %7.1f img/s  peak %s GB",
                    record["model"],
                    provider,
                    dtype,
                    pass_,
                    record["median_ms"],
                    record["images_per_s"],
                    "-" if record["peak_mem_gb"] is None else f"{record['peak_mem_gb']:.2f}",
                )
    results.write()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
