"""What the loop needs to know about batches and dataloaders.

Moving a batch to a device, splitting it into inputs and targets, its size,
a loader's length, skipping the first batches of an epoch, finding a model's own
step methods, and a batch's fingerprint for processes to compare. None of these is
a hook: the core's hook implementations
(`hooktrain.defaults`) and the loops use them, and so may plugins.
"""

from __future__ import annotations

import inspect
import itertools
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

from hooktrain.errors import ConfigurationError

__all__ = [
    "STEP_NAMES",
    "batch_size",
    "check_model_steps",
    "compiled_step",
    "fingerprint",
    "length",
    "limited_length",
    "move_to_device",
    "predict_inputs",
    "skip_first_batches",
    "skips_by_index",
    "step_arguments",
    "step_batch_size",
    "unpack_batch",
    "unwrap_compiled",
    "user_method",
]


def move_to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside tuples, lists and dicts on ``device``.

    Returns ``obj`` itself when nothing had to move, so the common case allocates
    nothing.
    """
    cls = type(obj)
    if cls is tuple or cls is list:
        # The usual batch, a pair of tensors already in place (pre-batched data, the
        # CPU), is settled first, in one pass without a call per item.
        for item in obj:
            if type(item) is not torch.Tensor or item.device != device:
                break
        else:
            return obj
        moved = [move_to_device(item, device) for item in obj]
        if all(a is b for a, b in zip(moved, obj, strict=True)):
            return obj
        return cls(moved)
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=True)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return cls(*(move_to_device(item, device) for item in obj))
    if isinstance(obj, Mapping):
        return {key: move_to_device(value, device) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return cls(move_to_device(item, device) for item in obj)
    return obj


#: The model's own step method of each stage.
STEP_NAMES = {
    "train": "training_step",
    "validate": "validation_step",
    "test": "test_step",
    "predict": "predict_step",
}


def unpack_batch(batch: Any, stage: str = "train") -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch: a pair, or a dict with ``"inputs"`` and
    ``"targets"``.

    :raises ConfigurationError: for any other batch, saying what was received and
        which of the model's step methods (``stage``'s) would take it as it is.
    """
    # A tuple of types, not ``tuple | list``: a union is checked more slowly, and
    # this runs every step.
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping) and "inputs" in batch and "targets" in batch:
        return batch["inputs"], batch["targets"]
    if isinstance(batch, tuple | list):
        described = f"a {type(batch).__name__} of length {len(batch)}"
    elif isinstance(batch, Mapping):
        described = f"a {type(batch).__name__} with keys {', '.join(map(repr, batch)) or 'none'}"
    else:
        described = f"a {type(batch).__name__}"
    step = STEP_NAMES.get(stage, "training_step")
    raise ConfigurationError(
        f"cannot unpack the batch into (inputs, targets): got {described}. A model "
        f"without its own {step} needs batches of two items (inputs, targets) "
        f"or a dict with 'inputs' and 'targets'; otherwise define {step}(batch, "
        f"batch_idx) on the model."
    )


def predict_inputs(batch: Any) -> Any:
    """What a plain model is given in ``predict``: the first item of a tuple or list
    (``(inputs,)``, ``(inputs, targets)``...: targets may follow, or not), the
    ``"inputs"`` of a dict that has them (as in training), and otherwise the batch
    itself (a tensor, or a dict the model takes whole).

    :raises ConfigurationError: for a tuple or list of tensors whose first
        dimensions differ, which holds one tensor per sample (a collate's list of
        ragged sequences), not fields of one batch: its first item is one sample.
    """
    if isinstance(batch, (tuple, list)):
        if (
            len(batch) > 1
            and all(isinstance(item, torch.Tensor) and item.ndim for item in batch)
            and len({item.shape[0] for item in batch}) > 1
        ):
            raise ConfigurationError(
                f"predict was given a {type(batch).__name__} of {len(batch)} tensors "
                f"whose first dimensions differ, one tensor per sample rather than the "
                f"fields of one batch; a model without its own predict_step is given "
                f"the first item, one sample. Define predict_step(batch, batch_idx) on "
                f"the model (returning self(batch)), or collate the batch as (inputs,)"
            )
        return batch[0]
    if isinstance(batch, Mapping) and "inputs" in batch:
        return batch["inputs"]
    return batch


def batch_size(batch: Any, default: int = 1) -> int:
    """The first dimension of the batch's first tensor with one, else ``default``.

    ``batch`` is a tensor, a tuple or list, or a dict. A container's own tensors
    come first, then those of the dicts inside it, in order: ``{"inputs": {"image":
    x, "text": t}, "targets": y}`` weighs ``y``'s first dimension, and
    ``({"a": x1, "b": x2}, labels_list)`` weighs ``x1``'s. Tuples and lists inside
    are not searched: they may hold one tensor per sample (``(list of ragged
    sequences, list of labels)``, whose first sequence's length is no batch size),
    so such a batch weighs ``default`` unless its step says its ``"batch_size"``.
    """
    # Called every step: the common tuple is tested first, and shape[0] is read
    # rather than len(), which goes through a Python-level Tensor.__len__.
    cls = type(batch)
    if cls is tuple or cls is list or isinstance(batch, tuple | list):
        items: Iterable[Any] = batch
    elif isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else default
    elif isinstance(batch, Mapping):
        items = batch.values()
    else:
        return default
    for item in items:
        if isinstance(item, torch.Tensor) and item.ndim:
            return item.shape[0]
    # Reached only when this level holds no tensor; dicts (a dict subclass
    # included) by a check that is quick on strings and token lists too.
    for item in items:
        if isinstance(item, dict):
            found = batch_size(item, 0)
            if found:
                return found
    return default


def step_batch_size(outputs: Any, batch_guess: int) -> int:
    """How much one batch weighs in the epoch's means, once its step has run.

    A step's dict may say it (``"batch_size"``): that wins, for batches no rule can
    read (packed sequences, a dict of ragged lists). Otherwise, when the dict holds
    ``"outputs"`` (the core's step for a plain model does), it is the first
    dimension of the outputs (of their first tensor that has one, for a tuple or
    dict of them), in training as in evaluation: for time-major inputs of shape
    ``(T, B, F)`` and outputs of shape ``(B, C)`` that is ``B``, not ``T`` (outputs
    of shape ``(T, B, C)`` give ``T``). Outputs in a list are taken for one entry
    per sample (a detection model's boxes per image, of ragged shapes): the batch
    weighs the list's length. Otherwise ``batch_guess``: `batch_size` of
    the batch as it arrived, before the step could take it apart. The loss, the
    step's other values and the ``metrics=`` functions' values all weigh this.
    """
    # The usual dict, and the loss tensor, settled without the Mapping ABC's check;
    # an OrderedDict or another mapping says what a dict says.
    if type(outputs) is dict or (
        type(outputs) is not torch.Tensor and isinstance(outputs, Mapping)
    ):
        given = outputs.get("batch_size")
        if given is not None:
            return int(given)
        predicted = outputs.get("outputs")
        if isinstance(predicted, torch.Tensor) and predicted.ndim:
            return predicted.shape[0]
        if isinstance(predicted, list):
            return len(predicted) or batch_guess
        if predicted is not None:
            return batch_size(predicted, batch_guess)
    return batch_guess


def length(loader: Any) -> int | None:
    """``len(loader)``, or ``None`` when it has none."""
    try:
        return len(loader)
    except TypeError:
        return None


def limited_length(loader: Any, limit: int | None) -> int | None:
    """Batches a stage takes from ``loader``: its length capped by ``limit``
    (``limit_*_batches``); ``None`` when neither is known."""
    found = length(loader)
    if limit is not None:
        found = limit if found is None else min(found, limit)
    return found


_MODULE_GETATTR = torch.nn.Module.__getattr__


def user_method(module: Any, name: str) -> Any:
    """``getattr(module, name, None)``, without its cost for a plain module.

    A name an ``nn.Module`` lacks goes through ``Module.__getattr__``, which builds
    and raises an AttributeError: a microsecond on every step for a model without
    ``training_step``. The same places are looked up here without raising.
    """
    cls = type(module)
    if getattr(cls, "__getattr__", None) is not _MODULE_GETATTR:
        return getattr(module, name, None)  # a wrapper that forwards attributes
    state = module.__dict__
    if (
        name in state
        or hasattr(cls, name)
        or name in state.get("_parameters", ())
        or name in state.get("_buffers", ())
        or name in state.get("_modules", ())
    ):
        return getattr(module, name)
    return None


def step_arguments(step: Callable[..., Any], stage: str) -> tuple[bool, bool]:
    """Which of ``batch_idx`` and ``dataloader_idx`` a model's own step for
    ``stage`` takes after the batch: ``(takes batch_idx, takes dataloader_idx)``.

    As in Lightning, ``batch_idx`` is passed only to a step that takes it (``def
    training_step(self, batch)`` is called with the batch alone), and
    ``dataloader_idx`` (by keyword) only to an evaluation step that names it. A
    step whose parameters cannot be read (``*args, **kwargs`` wrapping nothing)
    is given both that its stage offers.

    :raises ConfigurationError: for a step that can be called neither with the
        batch and its index nor with the batch alone.
    """
    name = STEP_NAMES[stage]
    signature = _step_signature(step)
    if signature is None:
        return True, False
    parameter = signature.parameters.get("dataloader_idx")
    by_keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    loader = stage != "train" and parameter is not None and parameter.kind in by_keyword
    for arguments in ((None, 0), (None,)):
        try:
            signature.bind(*arguments, **({"dataloader_idx": 0} if loader else {}))
        except TypeError:
            continue
        return len(arguments) == 2, loader
    raise ConfigurationError(
        f"the model's {name}{signature} can be called neither as {name}(batch, "
        f"batch_idx) nor as {name}(batch): give it the parameters (batch, batch_idx)"
    )


def check_model_steps(module: Any, stages: Iterable[str]) -> None:
    """`step_arguments` of each of ``module``'s own steps for ``stages``, so that
    ``fit`` refuses a validation step it cannot call before training, not at its
    first validation, an epoch later.

    :raises ConfigurationError: as `step_arguments`.
    """
    for stage in stages:
        step = user_method(module, STEP_NAMES[stage])
        if step is not None:
            step_arguments(step, stage)


def _step_signature(step: Callable[..., Any]) -> inspect.Signature | None:
    """The parameters a step takes, read from the step itself; through
    ``__wrapped__`` only when it takes ``*args, **kwargs`` (a decorator's wrapper,
    FSDP's ``register_fsdp_forward_method``). ``inspect.signature`` reads through
    every wrapper, and drops the bound ``self`` once too often when the wrapped one
    is a bound method, as FSDP's is."""
    try:
        outer = inspect.signature(step, follow_wrapped=False)
    except (TypeError, ValueError):
        return None
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    if any(p.kind not in variadic for p in outer.parameters.values()):
        return outer
    inner = getattr(step, "__wrapped__", None)
    if inner is None:
        return None
    try:
        signature = inspect.signature(inner, follow_wrapped=False)
    except (TypeError, ValueError):
        return None
    if isinstance(step, types.MethodType) and inspect.isfunction(inner):
        # A method decorated in its class: the wrapped function still takes self.
        return signature.replace(parameters=list(signature.parameters.values())[1:])
    return signature


def _compiled_module_type() -> type | None:
    """torch.compile's module wrapper class, ``None`` while dynamo is not imported
    (then no model can be one, and the core does not pay for importing it)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(eval_frame, "OptimizedModule", None)


def unwrap_compiled(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside ``torch.compile(module)``'s wrapper (an
    ``OptimizedModule``, which shares the module's parameters but prefixes every
    state-dict key with ``_orig_mod.``), else ``model`` itself.

    The trainer keeps it as ``trainer.module``: checkpoints hold its keys, and its
    own step methods are found on it, as for a model that was never compiled.
    """
    compiled = _compiled_module_type()
    while compiled is not None and isinstance(model, compiled):
        model = model._orig_mod
    return model


def compiled_step(model: torch.nn.Module, step: Callable[..., Any]) -> Callable[..., Any]:
    """``step``, a method of the user's module, run through ``model``'s compiler
    when ``model`` is ``torch.compile``'s wrapper of that same module.

    ``torch.compile(module)`` compiles only ``forward``; a loop that calls the
    module's own ``training_step`` would never enter it. The wrapper's compiler
    (its ``dynamo_ctx``: the backend, mode, fullgraph and dynamic it was made
    with) is applied to the step instead, so the step runs compiled with the
    user's settings and the forward it calls is traced inside it. Anything else
    (no wrapper, a wrapper of something else, a step that is not a bound method)
    is returned unchanged.
    """
    compiled = _compiled_module_type()
    if (
        compiled is None
        or not isinstance(model, compiled)
        or type(step) is not types.MethodType
        or model._orig_mod is not step.__self__
    ):
        return step
    return model.dynamo_ctx(step)


class _SkipFirstBatches(Sampler[list[int]]):
    """A batch sampler that drops the first ``skip`` batches of another, by index.

    Only indices are skipped: the dataset is never asked for the skipped samples.
    """

    def __init__(self, batch_sampler: Iterable[list[int]], skip: int) -> None:
        self.batch_sampler = batch_sampler
        self.skip = skip

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)  # type: ignore[arg-type]


def skips_by_index(dataloader: Any) -> bool:
    """Whether `skip_first_batches` can skip ``dataloader``'s batches by index,
    loading none of them, and still give the rest exactly as an uninterrupted
    epoch would.

    True for a plain map-style ``DataLoader`` without worker processes. With
    workers, each batch is loaded by worker ``index % num_workers``, whose random
    stream advanced over the batches it loaded before: skipping by index would
    hand the remaining batches to other workers in other states, so those loaders
    are advanced by loading the skipped batches instead.
    """
    return (
        type(dataloader) is DataLoader
        and not isinstance(dataloader.dataset, IterableDataset)
        and dataloader.batch_sampler is not None
        and dataloader.num_workers == 0
    )


def skip_first_batches(dataloader: Iterable[Any], skip: int) -> Iterable[Any]:
    """``dataloader`` without its first ``skip`` batches.

    A loader for which `skips_by_index` holds is rebuilt around a batch sampler
    that drops the first ``skip`` index lists; any other iterable is iterated and
    the first ``skip`` batches it yields are thrown away (the returned object is
    then that iterator).
    """
    if skip <= 0:
        return dataloader
    if skips_by_index(dataloader):
        assert isinstance(dataloader, DataLoader)
        return DataLoader(
            dataloader.dataset,
            batch_sampler=_SkipFirstBatches(dataloader.batch_sampler, skip),
            num_workers=0,
            collate_fn=dataloader.collate_fn,
            pin_memory=dataloader.pin_memory,
            timeout=dataloader.timeout,
            worker_init_fn=dataloader.worker_init_fn,
            generator=dataloader.generator,
            pin_memory_device=dataloader.pin_memory_device,
        )
    iterator = iter(dataloader)
    for _ in itertools.islice(iterator, skip):
        pass
    return iterator


def fingerprint(batch: Any) -> list[Any]:
    """What two processes compare to tell whether they hold the same batch (or
    sample): for each tensor in it (or array, turned into one), its shape, dtype,
    its count of NaN and two sums in float64 (the second weighs each element by its
    position, so that a reordered batch differs); plain values as they are. Small,
    so that a batch of images does not cross the network. Reads the tensors: one
    device sync per tensor, for a check made once per stage, not per step."""
    if isinstance(batch, torch.Tensor):
        flat = batch.detach().reshape(-1).double().cpu()
        nans = int(flat.isnan().sum())
        flat = torch.nan_to_num(flat)
        positions = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
        sums = [flat.sum().item(), (flat @ positions).item()]
        return [tuple(batch.shape), str(batch.dtype), nans, *sums]
    if isinstance(batch, Mapping):
        return [[key, fingerprint(value)] for key, value in batch.items()]
    if isinstance(batch, tuple | list):
        return [fingerprint(item) for item in batch]
    if batch is None or isinstance(batch, str | int | float | bool):
        return [batch]
    try:
        return fingerprint(torch.as_tensor(batch))  # a NumPy array
    except (TypeError, ValueError, RuntimeError):
        return [type(batch).__name__]
