"""One registered custom op per kernel call, and the cheaper route eager mode takes to the same code.

Every Triton/CUDA entry point (forward and backward of each op) is registered once with torch.library: its
schema, fake implementation and autograd formula are what torch.compile, torch.export, FakeTensor and
dispatch modes see. Calling a Python custom op in eager mode costs several layers of Python (the dispatcher's
Python kernel, the generated autograd wrapper, argument normalisation): tens of microseconds per call, as
long as a DECO-sized kernel runs (``python -m benchmarks.host_overhead`` measures it). So in plain eager mode
a :class:`KernelOp` runs the *same* implementation, ``setup_context`` and backward as a
``torch.autograd.Function`` instead; anything else (compiling, tracing, fake or subclass tensors, an active
dispatch mode) goes through the registered custom op. Same functions, same results; only the route differs.

The "cuda" backend's eager calls go further: ``torch.ops.deco_kernels_C.<op>`` (csrc/autograd.cpp) runs the
same primitives and the same formulas as one C++ autograd node, so that a backward runs no Python at all (a
Python node's backward costs the engine's device thread the GIL and every layer of the call above; on the GPU
machines this was most of an op's host time). Tests hold the two routes to bitwise the same results.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch

__all__ = ["KernelOp", "python_route"]

# Exactly these types (not subclasses: FakeTensor, FunctionalTensor, DTensor, ...) take the eager route.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)

_native_route = True


@contextlib.contextmanager
def python_route() -> Iterator[None]:
    """Within the block, the "cuda" backend's eager calls take the Python ``autograd.Function`` route, as the
    Triton backend's do, instead of its C++ autograd nodes: for measurements that compare the two."""
    global _native_route
    previous = _native_route
    _native_route = False
    try:
        yield
    finally:
        _native_route = previous


def _outside_tracing() -> bool:
    """True outside torch.compile/export, dispatch modes and torch.func transforms."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._functorch.peek_interpreter_stack() is not None
    )


class KernelOp:
    """A torch.library custom op (``.custom_op``) whose calls take the eager route where they can.

    ``qualname`` is ``"deco_kernels::<name>"``; ``impl`` is the op's implementation (its type annotations
    give the schema), ``fake`` its fake implementation; :meth:`register_autograd` takes the ``backward``
    and ``setup_context`` of ``torch.library.register_autograd`` and uses them for both routes. ``backward`` gets
    None, not zeros, for the gradients of the outputs ``setup_context`` marks non-differentiable, and is not called
    when the first output's gradient is None. ``native``: ``torch.ops.deco_kernels_C.<name>`` (the op's arguments
    without the backend, which is the last) runs the op's eager calls with backend "cuda".
    """

    def __init__(self, qualname: str, impl: Callable, fake: Callable, *, native: bool = False):
        self._impl = impl
        self._native = native
        self.name = qualname.split("::")[-1]
        self.custom_op = torch.library.custom_op(qualname, impl, mutates_args=())
        self.custom_op.register_fake(fake)
        self._function: type[torch.autograd.Function] | None = None

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        def setup_without_zero_gradients(ctx, inputs, output):
            # The gradients of the outputs no loss reaches (argmax indices, LayerNorm statistics) would otherwise
            # arrive as zero tensors: an allocation and a fill kernel each, on every backward, that no backward
            # reads. Each op's first output is its one differentiable output.
            ctx.set_materialize_grads(False)
            setup_context(ctx, inputs, output)

        def backward_of_defined_gradient(ctx, grad, *unused_grads):
            # A consumer whose backward returned None leaves this op's output without a gradient: no gradients
            # for its inputs either, as a stock op gives.
            if grad is None:
                return (None,) * len(ctx.needs_input_grad)
            return backward(ctx, grad, *unused_grads)

        self.custom_op.register_autograd(backward_of_defined_gradient, setup_context=setup_without_zero_gradients)
        impl = self._impl

        # The ctx-taking form of forward: the form with a separate setup_context binds its arguments through
        # inspect.signature on every call (tens of microseconds). torch.func transforms never get here
        # (__call__ sends them to the custom op).
        def forward(ctx, *args):
            output = impl(*args)
            setup_without_zero_gradients(ctx, args, output)
            return output

        name = "".join(part.title() for part in self.name.split("_")) + "Function"
        self._function = type(
            name,
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward_of_defined_gradient)},
        )

    @functools.cached_property
    def _native_op(self) -> torch._ops.OpOverload:
        # The extension is loaded: backend "cuda" resolved, which needs it.
        return getattr(torch.ops.deco_kernels_C, self.name).default

    def __call__(self, *args):
        # Every kernel call passes here, so it is one loop over the arguments rather than generator expressions:
        # plain tensors only (not subclasses), and whether any needs a gradient.
        if _outside_tracing():
            needs_grad = False
            for arg in args:
                if isinstance(arg, torch.Tensor):
                    if type(arg) not in _PLAIN_TENSOR_TYPES:
                        break
                    needs_grad = needs_grad or arg.requires_grad
            else:
                if self._native and _native_route and args[-1] == "cuda":
                    return self._native_op(*args[:-1])
                if not (needs_grad and torch.is_grad_enabled()):
                    return self._impl(*args)  # no graph to record (inference, or the backward pass itself)
                if self._function is not None:
                    return self._function.apply(*args)
        # Also an op without an autograd formula called on tensors that need grad: the custom op's error
        # ("autograd not registered") is the right answer when that graph is differentiated.
        return self.custom_op(*args)
