"""The ``compile`` plugin: every stage's steps run through :func:`torch.compile`.

Select it like any plugin, with ``torch.compile``'s own options::

    trainer = hooktrain.Trainer(plugins=["tqdm", ("compile", {"mode": "max-autotune"})])

In ``prepare``, after every other plugin's (``trylast``), it replaces
``trainer.model`` with ``torch.compile(trainer.model, ...)``. What then runs
compiled is what the step really runs:

* a plain model: its ``forward`` (the core's step calls ``trainer.model(inputs)``);
* a model with its own ``training_step`` / ``validation_step`` / ``test_step`` /
  ``predict_step``: the whole step, loss included, because the core runs a
  module's own step through the compiler of a ``torch.compile`` wrapper of that
  module (:func:`hooktrain.batches.compiled_step`). A model the user compiled
  before passing it to ``fit`` is run the same way, without this plugin;
* with a plugin that wraps the model for distributed training (``accelerate``:
  ``DistributedDataParallel``), the wrapped model: compiling after the DDP wrap
  lets dynamo split the graph at DDP's gradient buckets, so that the all-reduce of
  one bucket overlaps the backward of the next.

``trainer.module`` stays the user's module, so checkpoints hold its plain keys
(no ``_orig_mod.`` prefix) and load into a run with or without this plugin.
Under ``amp`` the compiled code runs inside its autocast (dynamo traces the
autocast state as part of the graph's guards).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hooktrain.batches import unwrap_compiled
from hooktrain.errors import ConfigurationError
from hooktrain.markers import hookimpl

if TYPE_CHECKING:
    from torch import nn

    from hooktrain.trainer import Trainer

__all__ = ["CompilePlugin"]


class CompilePlugin:
    """Compiles the model the loop runs with ``torch.compile``.

    :param backend: a backend name (``"inductor"``, the default; ``"eager"``,
        ``"aot_eager"``, ... as ``torch._dynamo.list_backends(exclude_tags=())``
        lists them) or a backend callable ``(graph_module, example_inputs) ->
        callable``.
    :param mode: ``None`` or one of inductor's modes (``"default"``,
        ``"reduce-overhead"``, ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``);
        only with ``backend="inductor"``.
    :param fullgraph: ``True`` makes any graph break an error (raised at the first
        step that breaks) instead of a fall-back to Python.
    :param dynamic: ``None`` (torch's default: static first, dynamic shapes after a
        shape changed), ``True`` or ``False``.
    :raises ConfigurationError: for any option torch.compile would refuse, when the
        plugin is built (that is, when the ``Trainer`` is).
    """

    name = "compile"
    # Two compile plugins would compile the first one's wrapper again.
    exclusive_roles = ("compile",)

    def __init__(
        self,
        backend: str | Callable[..., Any] = "inductor",
        mode: str | None = None,
        fullgraph: bool = False,
        dynamic: bool | None = None,
    ) -> None:
        _check_backend(backend)
        if mode is not None:
            _check_mode(mode, backend)
        if not isinstance(fullgraph, bool):
            raise ConfigurationError(f"compile: fullgraph must be True or False, got {fullgraph!r}")
        if dynamic is not None and not isinstance(dynamic, bool):
            raise ConfigurationError(
                f"compile: dynamic must be None, True or False, got {dynamic!r}"
            )
        self.backend = backend
        self.mode = mode
        self.fullgraph = fullgraph
        self.dynamic = dynamic
        # (model, its compiled wrapper): a later stage on the same model reuses the
        # wrapper, and with it the code dynamo already compiled for that backend.
        self._compiled: tuple[nn.Module, nn.Module] | None = None

    def __repr__(self) -> str:
        return (
            f"CompilePlugin(backend={self.backend!r}, mode={self.mode!r}, "
            f"fullgraph={self.fullgraph}, dynamic={self.dynamic})"
        )

    @hookimpl
    def setup(self, trainer: Trainer) -> None:
        if unwrap_compiled(trainer.model) is not trainer.model:
            raise ConfigurationError(
                "compile: the model passed to the trainer is already compiled "
                "(torch.compile(model)); pass the plain model to compile it with this "
                "plugin's options, or drop 'compile' from the plugins to keep your own"
            )

    # trylast: compile what the other plugins' prepare made of the model (a DDP
    # wrapper included), never a model they would wrap again afterwards.
    @hookimpl(trylast=True)
    def prepare(self, trainer: Trainer) -> None:
        import torch

        model = trainer.model
        if self._compiled is not None and self._compiled[0] is model:
            trainer.model = self._compiled[1]
            return
        compiled = torch.compile(
            model,
            backend=self.backend,
            mode=self.mode,
            fullgraph=self.fullgraph,
            dynamic=self.dynamic,
        )
        self._compiled = (model, compiled)
        trainer.model = compiled


def _check_backend(backend: Any) -> None:
    if callable(backend):
        return
    if not isinstance(backend, str):
        raise ConfigurationError(
            f"compile: backend must be a backend name or a callable, got {backend!r}"
        )
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigurationError(
            f"compile: unknown backend {backend!r}; torch.compile knows {', '.join(known)}"
        )


def _check_mode(mode: Any, backend: Any) -> None:
    if backend != "inductor" and mode != "default":
        raise ConfigurationError(
            f"compile: mode={mode!r} is an option of the 'inductor' backend only, and "
            f"backend={backend!r}; drop mode or use backend='inductor'"
        )
    import torch._inductor

    modes = list(torch._inductor.list_mode_options())
    if mode not in modes:
        raise ConfigurationError(
            f"compile: unknown mode {mode!r}; inductor's modes are {', '.join(modes)}"
        )
