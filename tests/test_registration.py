"""The torch.library registration of every deco_kernels op: opcheck and torch.compile(fullgraph=True).

opcheck runs each custom op's schema, fake (meta) implementation, autograd registration and AOT-dispatch
tests with each backend that runs here: on the CPU Triton's interpreter and the CPU build of the CUDA kernels
(when deco_kernels._C is built), on a GPU both backends' kernels. The compile test traces a small module
using every op with the "aot_eager" compile backend: it traces forward and backward through the fake
implementations and the registered autograd exactly as inductor would, without inductor's C++/Triton code
generation, which would take minutes on a 2-core CPU and is not what is under test here.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from kernel_cases import TARGETS, assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import deco_kernels
from deco_kernels import nn as fused_nn
from deco_kernels.ops._kernel_op import KernelOp, python_route


def _leaf(*shape, device, channels_last=False, grad=True):
    t = torch.randn(*shape, device=device)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def _opcheck_cases(device, backend):
    """(name, op overload, args) for every custom op, small shapes, NCHW and channels-last."""
    ops = torch.ops.deco_kernels
    x = _leaf(2, 3, 5, 6, device=device)
    x_cl = _leaf(2, 3, 5, 6, device=device, channels_last=True)
    weight = _leaf(3, 1, 3, 5, device=device)
    bias = _leaf(3, device=device)
    query = _leaf(2, 3, 2, 3, device=device)
    grad_y = torch.randn(2, 3, 5, 6, device=device)
    norm_weight = _leaf(3, device=device)
    norm_bias = _leaf(3, device=device)
    grad_out = torch.randn(2, 5, 6, 3, device=device)
    mean, rstd = torch.randn(2, 5, 6, device=device), torch.rand(2, 5, 6, device=device) + 0.5
    z = _leaf(2, 5, 6, 3, device=device)
    ffn = _leaf(2, 5, 6, 3, device=device)
    gamma = _leaf(3, device=device)
    return [
        ("depthwise_conv2d", ops.depthwise_conv2d.default, (x, weight, bias, backend)),
        ("depthwise_conv2d_cl_no_bias", ops.depthwise_conv2d.default, (x_cl, weight, None, backend)),
        ("depthwise_conv2d_backward", ops.depthwise_conv2d_backward.default,
         (grad_y, x.detach(), weight.detach(), [True, False, True], backend)),
        ("upsample_add_conv", ops.upsample_add_conv.default, (query, x_cl, weight, bias, backend)),
        ("upsample_add_conv_backward", ops.upsample_add_conv_backward.default,
         (grad_y, query.detach(), x.detach(), weight.detach(), [True, True, False, True], backend)),
        ("depthwise_conv2d_layernorm", ops.depthwise_conv2d_layernorm.default,
         (x, weight, bias, norm_weight, norm_bias, 1e-6, backend)),
        ("depthwise_conv2d_layernorm_cl_no_bias", ops.depthwise_conv2d_layernorm.default,
         (x_cl, weight, None, norm_weight, norm_bias, 1e-6, backend)),
        ("depthwise_conv2d_layernorm_backward", ops.depthwise_conv2d_layernorm_backward.default,
         (grad_out, x_cl.detach(), weight.detach(), bias.detach(), norm_weight.detach(), mean, rstd,
          [True, False, True, True, False], backend)),
        ("adaptive_max_pool2d", ops.adaptive_max_pool2d.default, (x, [2, 4], backend)),
        ("adaptive_avg_pool2d", ops.adaptive_avg_pool2d.default, (x_cl, [2, 4], backend)),
        ("scale_residual_max_pool", ops.scale_residual_max_pool.default, (z, ffn, gamma, [2, 4], backend)),
    ]


@pytest.mark.parametrize("device, backend", TARGETS)
def test_opcheck_every_op(device, backend):
    for name, op, args in _opcheck_cases(device, backend):
        try:
            torch.library.opcheck(op, args)
        except Exception as error:
            raise AssertionError(f"opcheck failed for {name}") from error


class _EveryOp(torch.nn.Module):
    """A miniature SIM + CIM: dwconv + LayerNorm on the queries (residual), dwconv on the memory,
    upsample-add-conv of the queries, max pool, the fused back end (layer-scaled residual + max pool) on the
    channels-innermost map, plus an avg pool."""

    def __init__(self, channels: int):
        super().__init__()
        self.sim_dwconv = fused_nn.DepthwiseConv2d(channels, 3)
        self.sim_norm = torch.nn.LayerNorm(channels, eps=1e-6)
        self.dwconv = fused_nn.DepthwiseConv2d(channels, 3)
        self.cim = fused_nn.UpsampleAddConv(channels, 5)
        self.max_pool = fused_nn.AdaptiveMaxPool2d((3, 3))
        self.avg_pool = fused_nn.AdaptiveAvgPool2d((1, 2))
        self.gamma = torch.nn.Parameter(torch.randn(channels))

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        query = query + self.sim_dwconv.forward_layer_norm(query, self.sim_norm).permute(0, 3, 1, 2)
        fused = self.cim(query, self.dwconv(memory))
        pooled = self.max_pool(fused)
        z = fused.permute(0, 2, 3, 1)
        pooled = pooled + deco_kernels.scale_residual_max_pool(z, z.tanh(), self.gamma, (3, 3))
        return pooled + self.avg_pool(fused).mean(dim=(2, 3), keepdim=True)


@pytest.mark.parametrize("device, backend", TARGETS)
def test_compile_fullgraph_matches_eager(device, backend):
    torch._dynamo.reset()
    model = _EveryOp(4).to(device)
    query = torch.randn(2, 4, 3, 3, device=device)
    memory = torch.randn(2, 4, 7, 8, device=device).contiguous(memory_format=torch.channels_last)

    def run(module):
        module.zero_grad()
        q = query.clone().requires_grad_()
        m = memory.clone().requires_grad_()
        out = module(q, m)
        out.square().sum().backward()
        return [out, q.grad, m.grad] + [p.grad for p in module.parameters()]

    with deco_kernels.use_backend(backend):
        eager = run(model)
        compiled = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    for index, (expected, actual) in enumerate(zip(eager, compiled)):
        assert_close(actual, expected, torch.float32, f"compiled vs eager, output/gradient {index}")


@pytest.mark.parametrize("device, backend", TARGETS)
def test_compile_fullgraph_on_first_call(device, backend, monkeypatch):
    """Compiling before any eager call: choosing and logging the backend must not break the graph."""
    torch._dynamo.reset()
    monkeypatch.setattr(deco_kernels.backend, "_resolved", {})
    model = _EveryOp(4).to(device)
    query = torch.randn(2, 4, 3, 3, device=device)
    memory = torch.randn(2, 4, 7, 8, device=device)
    with deco_kernels.use_backend(backend):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(query, memory)
        eager = model(query, memory)
    assert_close(compiled, eager, torch.float32, "compiled on first call vs eager")


class _RecordingMode(TorchDispatchMode):
    """Records the deco_kernels custom ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "deco_kernels":
            self.ops.add(func._opname)
        return func(*args, **(kwargs or {}))


def _every_op_inputs(device) -> tuple[_EveryOp, torch.Tensor, torch.Tensor]:
    """The model, a query (2 x 4 x 3 x 3) and a channels-last memory (2 x 4 x 7 x 8), seeded."""
    torch.manual_seed(0)
    model = _EveryOp(4).to(device)
    query = torch.randn(2, 4, 3, 3, device=device)
    memory = torch.randn(2, 4, 7, 8, device=device).contiguous(memory_format=torch.channels_last)
    return model, query, memory


def _forward_backward(model, query, memory) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A forward and backward from fresh leaves: (output, [output, the inputs' and the parameters' gradients])."""
    model.zero_grad()
    q, m = query.clone().requires_grad_(), memory.clone().requires_grad_()
    out = model(q, m)
    out.square().sum().backward()
    return out, [out, q.grad, m.grad] + [p.grad for p in model.parameters()]


def _kernel_ops() -> list[KernelOp]:
    found = []
    # By module path: the package deco_kernels.ops exports functions under some of these names.
    for name in ("adaptive_pool", "depthwise_conv2d", "depthwise_conv2d_layernorm", "scale_residual_max_pool",
                 "upsample_add_conv"):
        module = importlib.import_module(f"deco_kernels.ops.{name}")
        found += [value for value in vars(module).values() if isinstance(value, KernelOp)]
    return found


@pytest.mark.parametrize("device, backend", TARGETS)
def test_eager_route_skips_the_dispatcher_and_equals_the_custom_op(device, backend, monkeypatch):
    """Plain eager calls run each op's implementation through an autograd.Function; under a dispatch mode
    (as under tracing) they go through the registered custom ops. Same functions, so bitwise the same."""
    model, query, memory = _every_op_inputs(device)

    def run():
        return _forward_backward(model, query, memory)[1]

    kernel_ops = _kernel_ops()
    assert len(kernel_ops) == 12  # six ops, forward and backward
    with deco_kernels.use_backend(backend):
        with monkeypatch.context() as patched:
            for kernel_op in kernel_ops:
                patched.setattr(kernel_op, "custom_op", lambda *args: pytest.fail("an eager call took the custom op"))
            eager = run()
        with _RecordingMode() as mode:
            dispatched = run()
    assert mode.ops == {kernel_op.name for kernel_op in kernel_ops}
    for index, (expected, actual) in enumerate(zip(dispatched, eager, strict=True)):
        assert torch.equal(actual, expected), f"output/gradient {index}: eager route differs from the custom op"


@pytest.mark.parametrize("route", ["eager", "custom op"])
@pytest.mark.parametrize("device, backend", TARGETS)
def test_no_gradient_is_allocated_for_non_differentiable_outputs(device, backend, route):
    """The max pools' argmax and the conv + LayerNorm statistics get no gradient: backward receives None for
    them on either route, where autograd's default would allocate and zero-fill one tensor each."""
    model, query, memory = _every_op_inputs(device)
    query.requires_grad_()
    memory.requires_grad_()
    mode = _RecordingMode() if route == "custom op" else contextlib.nullcontext()
    with deco_kernels.use_backend(backend), torch.profiler.profile() as profile, mode:
        model(query, memory).square().sum().backward()
    assert route == "eager" or "depthwise_conv2d_layernorm_backward" in mode.ops
    # Five without it: the max pool's indices, the LayerNorm's mean and rstd, the back end's indices and picks.
    assert [event.name for event in profile.events()].count("aten::zeros") == 0
    assert query.grad is not None and memory.grad is not None


# The "cuda" backend's targets: its eager calls take the C++ autograd route (torch.ops.deco_kernels_C.<op>).
CUDA_TARGETS = [target for target in TARGETS if target.values[1] == "cuda"]

_NATIVE_NODES = {"DepthwiseConv2dFunction", "DepthwiseConv2dLayerNormFunction", "UpsampleAddConvFunction",
                 "AdaptiveMaxPool2dFunction", "AdaptiveAvgPool2dFunction", "ScaleResidualMaxPoolFunction"}


def _graph_node_names(root) -> set[str]:
    seen, names, pending = set(), set(), [root]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        pending.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("device, backend", CUDA_TARGETS)
def test_cuda_eager_route_is_one_cpp_node_per_op(device, backend, monkeypatch):
    """Backend "cuda" in eager mode: every op records one C++ autograd node (csrc/autograd.cpp) and neither its
    forward nor its backward runs any Python implementation, autograd.Function or custom op; within
    python_route() the same calls take the Python autograd.Function route, with bitwise the same results."""
    model, query, memory = _every_op_inputs(device)

    def run():
        out, results = _forward_backward(model, query, memory)
        native = {name.rsplit("::", 1)[-1].rstrip(">") for name in _graph_node_names(out.grad_fn) if "deco::" in name}
        return native, results

    def fail(*args):
        pytest.fail("an eager call of the cuda backend ran Python kernel code")

    with deco_kernels.use_backend(backend):
        with monkeypatch.context() as patched:
            for kernel_op in _kernel_ops():
                patched.setattr(kernel_op, "custom_op", fail)
                patched.setattr(kernel_op, "_impl", fail)
                patched.setattr(kernel_op, "_function", None)
            native_nodes, native = run()
        with python_route():
            python_nodes, python = run()
    assert native_nodes == _NATIVE_NODES and not python_nodes
    assert all(t is not None for t in native)
    for index, (expected, actual) in enumerate(zip(python, native, strict=True)):
        assert torch.equal(actual, expected), f"output/gradient {index}: the C++ route differs from the Python route"


@pytest.mark.parametrize("device, backend", CUDA_TARGETS)
def test_opcheck_native_ops(device, backend):
    """The C++ ops of the cuda eager route: schemas that tell the truth about aliasing, autograd registered."""
    for name, op, args in _opcheck_cases(device, backend):
        if name.endswith("_backward"):
            continue
        native = getattr(torch.ops.deco_kernels_C, op._opname).default
        try:
            torch.library.opcheck(native, args[:-1], test_utils=("test_schema", "test_autograd_registration"))
        except Exception as error:
            raise AssertionError(f"opcheck failed for the native {name}") from error


class _NoGradient(torch.autograd.Function):
    """The identity, whose backward gives its input no gradient: the node before it receives an undefined one."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("route", ["eager", "custom op"])
@pytest.mark.parametrize("device, backend", TARGETS)
def test_an_undefined_output_gradient_gives_no_gradients(device, backend, route):
    """A consumer whose backward returns None: each op's backward then gets None for its output (its gradients
    are not materialised) and must give None, as the stock ops do, on every route."""
    model, query, memory = _every_op_inputs(device)
    query.requires_grad_()
    memory.requires_grad_()
    mode = _RecordingMode() if route == "custom op" else contextlib.nullcontext()
    with deco_kernels.use_backend(backend), mode:
        (_NoGradient.apply(model(query, memory)).sum() + query.sum()).backward()
    assert torch.equal(query.grad, torch.ones_like(query))
    assert memory.grad is None
    assert all(parameter.grad is None for parameter in model.parameters())


@pytest.mark.parametrize("route", ["eager", "custom op"])
@pytest.mark.parametrize("device, backend", CUDA_TARGETS)
def test_double_backward_without_a_formula_raises_on_every_route(device, backend, route):
    """Under create_graph the C++ nodes call the registered backward op, so an op whose backward has no autograd
    formula (the convolutions; the pools have one, tests/test_adaptive_pool.py) fails as on the custom-op route."""
    x = torch.randn(1, 4, 6, 6, device=device, requires_grad=True)
    weight = torch.randn(4, 1, 3, 3, device=device, requires_grad=True)
    mode = _RecordingMode() if route == "custom op" else contextlib.nullcontext()
    with mode:
        y = deco_kernels.depthwise_conv2d(x, weight, backend=backend)
        (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="depthwise_conv2d_backward.* no autograd formula"):
            torch.autograd.grad(grad_x.sum(), weight)
