"""The model runner: the model's outputs under a chunk of weight samples.

:class:`ModelRunner` calls the model (or, for a subset posterior, only the submodule that holds the
tracked parameters, see :mod:`lightning_swag.predictive.subset`) once per weight sample with
``torch.func.functional_call`` (the model is never copied or modified), vectorised with ``vmap`` or
looped as :mod:`lightning_swag.predictive.vectorize` decides. It also owns the choices made at the first batch:

* the memory layout: on a CPU, conv nets with 4-D inputs run channels-last (oneDNN's fast
  convolutions) when a trial forward shows the model accepts it (``memory_format``);
* the split of a subset posterior, kept only when it reproduces the full path exactly, and then
  checked again on every batch (a batch that fails runs the whole model);
* for FSDP2-sharded models (DTensor parameters: ``functional_call`` and ``vmap`` fail on them), each
  sample's shards are copied into the model's own shards, one sample at a time, and put back after.

What the runner returns is the model's output made averageable: through ``output_transform`` when
given, ``.logits`` of an output that carries them (Hugging Face ``ModelOutput``), else the tensor.
Plain torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_swag.posterior.sharding import reshard_fsdp
from lightning_swag.predictive.batches import CallArguments, call_model, single_tensor
from lightning_swag.predictive.subset import SplitForward, SplitUnavailable, find_split
from lightning_swag.predictive.vectorize import OutputTypeError, SampleMap, Vectorize, choose_vectorization
from lightning_swag.predictive.weights import Chunk

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "ExecutionPlan",
    "MemoryFormat",
    "ModelRunner",
    "PreparedInputs",
    "channels_last_in_place",
    "extract_output",
]

MemoryFormat = Literal["auto", "channels_last", "preserve"]


@dataclass(frozen=True)
class ExecutionPlan:
    """How the forward passes run, as decided at the first batch (``None`` before it)."""

    vectorize: Vectorize | None
    """``"vmap"`` or ``"loop"`` (``"auto"`` until the first chunk is timed)."""
    channels_last: bool | None
    """Whether 4-D tensors run channels-last."""
    split: str | None
    """The submodule run under the weight samples, when the rest runs once per batch."""
    split_refused: str | None
    """Why the proposed split was not used (at the first batch), or why the latest batch that fell
    back to the whole model did."""
    split_fallbacks: int = 0
    """Batches that ran the whole model under every sample although the split was kept, because
    their per-batch check failed (see :mod:`lightning_swag.predictive.subset`)."""


@dataclass(frozen=True)
class PreparedInputs:
    """A batch as the forward passes under the samples take it."""

    inputs: Any
    """What the module run under the samples is called with: the split submodule's captured call
    arguments, or the model's inputs."""
    split: SplitForward | None
    """The split this batch takes (``None``: the whole model runs under every sample)."""


def extract_output(raw: Any, transform: Callable[[Any], Any] | None, accepts_pairs: bool, owner: str) -> Any:
    """The tensor to average from one forward pass (see the module docstring)."""
    if transform is not None:
        raw = transform(raw)
    if accepts_pairs and isinstance(raw, tuple) and len(raw) == 2 and all(isinstance(p, Tensor) for p in raw):
        return raw  # (mean, variance)
    if not isinstance(raw, Tensor) and transform is None:
        logits = raw.get("logits") if isinstance(raw, Mapping) else getattr(raw, "logits", None)
        if isinstance(logits, Tensor):
            return logits
    if not isinstance(raw, Tensor):
        hint = "output_transform returned" if transform is not None else f"{owner}.forward returned"
        raise OutputTypeError(
            f"SWAGModule averages tensors, but {hint} a {type(raw).__name__}. Pass "
            "SWAGModule(..., output_transform=f) with f mapping the model's output to the tensor to average, "
            "e.g. output_transform=lambda out: out[0] or lambda out: out['logits']."
        )
    return raw


def channels_last_in_place(weights: Tensor) -> Tensor:
    """``[S, O, I, kh, kw]`` conv weights, each sample's slice contiguous, rewritten in their own
    storage so that each slice has the channels-last strides of ``[O, kh, kw, I]`` in memory; a
    copy where the slices are not contiguous.

    Where a slice is already laid out channels-last (1×1 kernels, one input channel) no element
    moves, but the strides are still set to the canonical channels-last ones: convolution picks
    its kernel from the strides, and ambiguous ones send it to the slow path.
    """
    num, out_ch, in_ch, kh, kw = weights.shape
    to_channels_last = (0, 1, 3, 4, 2)
    if not weights[0].is_contiguous():
        return weights.permute(*to_channels_last).contiguous().permute(0, 1, 4, 2, 3)
    target = weights.as_strided(
        (num, out_ch, kh, kw, in_ch),
        (weights.stride(0), kh * kw * in_ch, kw * in_ch, in_ch, 1),
        weights.storage_offset(),
    )
    if not weights[0].is_contiguous(memory_format=torch.channels_last):  # the elements must move
        target.copy_(weights.permute(*to_channels_last).contiguous())
    return target.permute(0, 1, 4, 2, 3)


class ModelRunner:
    """Runs ``model`` under chunks of weight samples (see the module docstring).

    Args:
        model: the network (names inside it are the chunks' keys).
        tracked: names inside ``model`` of the parameters the samples replace.
        output_transform: maps the raw output to the tensor to average (or ``None``).
        accepts_pairs: whether a ``(mean, variance)`` pair is a valid output.
        vectorize: ``"auto"``, ``"vmap"`` or ``"loop"`` (or a bool).
        memory_format: ``"auto"``, ``"channels_last"`` or ``"preserve"``.
        split_forward: try the subset split of :mod:`lightning_swag.predictive.subset`.
        in_place: FSDP2: copy samples into the model's shards instead of ``functional_call``.
    """

    def __init__(
        self,
        model: nn.Module,
        tracked: list[str],
        output_transform: Callable[[Any], Any] | None = None,
        accepts_pairs: bool = False,
        vectorize: Vectorize | bool = "auto",
        memory_format: MemoryFormat = "auto",
        split_forward: bool = True,
        in_place: bool = False,
    ) -> None:
        self.model = model
        self.output_transform = output_transform
        self.accepts_pairs = accepts_pairs
        self.memory_format = memory_format
        self.in_place = in_place
        self._owner = type(model).__name__
        self._mapper = SampleMap(choose_vectorization(vectorize, _device(model)), "SWAGModule")
        self._conv_weights = {
            f"{name}.weight" if name else "weight"
            for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d)
        }
        self._channels_last: bool | None = None
        candidate = find_split(model, tracked, self.extract) if split_forward and not in_place else None
        self._split_candidate = candidate
        self._split: SplitForward | None = None
        self._split_refused: str | None = None
        self._split_fallbacks = 0
        self._first_capture: tuple[Any, CallArguments | None] | None = None
        self._decided = False

    # ------------------------------------------------------------------ decisions at the first batch
    @property
    def plan(self) -> ExecutionPlan:
        """The choices made at the first batch (see :class:`ExecutionPlan`)."""
        return ExecutionPlan(
            vectorize=self._mapper.mode,
            channels_last=self._channels_last,
            split=self._split.prefix if self._split is not None else None,
            split_refused=self._split_refused,
            split_fallbacks=self._split_fallbacks,
        )

    @property
    def split_candidate(self) -> SplitForward | None:
        """The split that will be verified at the first batch (before it), or the one kept (after it)."""
        return self._split if self._decided else self._split_candidate

    def decide(self, inputs: Any, mean_weights: Chunk | Callable[[], Chunk]) -> None:
        """Make the first-batch choices with the SWA mean ``mean_weights`` (model names, a one-sample
        chunk, or a function that draws it: it is only called at the first batch)."""
        if self._decided:
            return
        self._decided = True
        self._channels_last = self._decide_channels_last(inputs)
        candidate = self._split_candidate
        if candidate is not None:
            mean = mean_weights() if callable(mean_weights) else mean_weights
            tracked = {k: v[0] for k, v in mean.items()}
            reason, captured = candidate.verify(self._layout(inputs), self._base(), tracked)
            if reason is None:
                self._split = candidate
                self._first_capture = (inputs, captured)  # the first batch's: not captured again
            else:
                self._split_refused = reason

    def _decide_channels_last(self, inputs: Any) -> bool:
        tensor = single_tensor(inputs)
        if self.memory_format == "preserve" or self.in_place:
            return False
        eligible = tensor is not None and tensor.dim() == 4 and bool(self._conv_weights)
        if self.memory_format == "channels_last":
            if not eligible:
                raise ValueError(
                    "memory_format='channels_last' needs a model with Conv2d layers and 4-D inputs; use 'auto'."
                )
            return True
        if not eligible or _device(self.model).type != "cpu":
            return False
        assert tensor is not None
        # A trial on two inputs with the model's own weights laid out as the samples will be: does its
        # forward accept channels-last activations (a .view() may not)?
        weights_cl = {
            name: p.detach().contiguous(memory_format=torch.channels_last)
            for name, p in self.model.named_parameters()
            if name in self._conv_weights and p.dim() == 4
        }
        try:
            functional_call(
                self.model, weights_cl, (tensor[:2].contiguous(memory_format=torch.channels_last),)
            )
        except Exception:  # noqa: BLE001 - e.g. a .view() that needs contiguous activations
            return False
        return True

    # ------------------------------------------------------------------ running
    @property
    def prepare_key(self) -> bool:
        """What :meth:`prepare_chunk` depends on (part of the sample cache's key)."""
        return bool(self._channels_last)

    def prepare_chunk(self, chunk: Chunk) -> Chunk:
        """A chunk in the layout the forward passes use (sampled conv weights channels-last)."""
        if not self._channels_last:
            return chunk
        return {
            name: channels_last_in_place(v) if name in self._conv_weights and v.dim() == 5 else v
            for name, v in chunk.items()
        }

    def _layout(self, inputs: Any) -> Any:
        """``inputs`` in the memory layout decided at the first batch."""
        tensor = single_tensor(inputs)
        if self._channels_last and tensor is not None and tensor.dim() == 4:
            return tensor.contiguous(memory_format=torch.channels_last)
        return inputs

    def prepare_inputs(self, inputs: Any) -> PreparedInputs:
        """The batch's inputs as the forward passes take them: channels-last, and, when the split is
        kept and this batch passes its checks, the submodule's captured arguments (the rest of the
        network runs here, once); else the whole model runs under every sample."""
        first, self._first_capture = self._first_capture, None
        if first is not None and first[0] is inputs and first[1] is not None:
            return PreparedInputs(first[1], self._split)
        inputs = self._layout(inputs)
        if self._split is not None:
            try:
                return PreparedInputs(self._split.capture(inputs), self._split)
            except SplitUnavailable as why:
                self._split_fallbacks += 1
                self._split_refused = str(why)
        return PreparedInputs(inputs, None)

    def run(self, chunk: Chunk, prepared: PreparedInputs, buffers: Mapping[str, Tensor]) -> Any:
        """Outputs ``[n, B, ...]`` for the ``n`` samples of ``chunk`` on ``prepared`` inputs."""
        inputs, split = prepared.inputs, prepared.split
        if self.in_place:
            return self._run_in_place(chunk, inputs)
        module = self.model if split is None else split.submodule
        base, aliases = self._state(module)
        if split is not None:
            chunk, buffers = split.relative(chunk), split.relative(buffers)
        extract = self.extractor(split)

        def run_sample(weights: dict[str, Tensor], bufs: dict[str, Tensor], args: Any) -> Any:
            state = {**base, **weights, **bufs}
            for name, others in aliases.items():  # tied tensors: every name gets the sample
                if name in weights or name in bufs:
                    state.update(dict.fromkeys(others, state[name]))
            return extract(
                call_model(lambda *a, **k: functional_call(module, state, a, k, tie_weights=False), args)
            )

        return self._mapper(run_sample, chunk, buffers, inputs, model_name=self._owner)

    def extractor(self, split: SplitForward | None) -> Callable[[Any], Any]:
        """What turns the output of the module run under the samples into the tensor to average: the
        model's raw output through :meth:`extract`; a split submodule's output as it is (the split is
        only taken when that output *is* the model's)."""
        return self.extract if split is None else _identity

    def extract(self, raw: Any) -> Any:
        """The tensor to average from one raw model output (see :func:`extract_output`)."""
        return extract_output(raw, self.output_transform, self.accepts_pairs, self._owner)

    def _base(self, module: nn.Module | None = None) -> dict[str, Tensor]:
        """Every parameter (detached) and buffer of ``module`` (default: the model), by name."""
        module = module if module is not None else self.model
        base = {name: p.detach() for name, p in module.named_parameters()}
        base.update(dict(module.named_buffers()))
        return base

    @staticmethod
    def _state(module: nn.Module) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
        """Every tensor of ``module`` under every name it has, and ``{first name: its other names}``
        of the tied ones (read at every chunk: the model may have moved since): with them,
        ``functional_call(..., tie_weights=False)`` skips looking for ties at every call (a tenth of a
        millisecond per sample in the loop)."""
        base: dict[str, Tensor] = {}
        first: dict[int, str] = {}
        aliases: dict[str, list[str]] = {}
        named = [
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        ]
        for name, tensor in named:
            base[name] = tensor.detach()
            owner = first.setdefault(id(tensor), name)
            if owner != name:
                aliases.setdefault(owner, []).append(name)
        return base, aliases

    def _run_in_place(self, chunk: Chunk, inputs: Any) -> Any:
        """FSDP2 models: each sample's shards are copied into the parameters' local shards and the model
        runs as usual, one sample at a time; the trained shards are put back afterwards."""
        reshard_fsdp(self.model)
        params = dict(self.model.named_parameters())
        shards = {name: cast("DTensor", params[name]).to_local() for name in chunk}
        trained = {name: shard.clone() for name, shard in shards.items()}

        def run_sample(weights: dict[str, Tensor], bufs: dict[str, Tensor], args: Any) -> Any:
            for name, value in weights.items():
                shards[name].copy_(value)
            try:
                return self.extract(call_model(self.model, args))
            finally:
                reshard_fsdp(self.model)  # else the root group's next forward reuses stale unsharded weights

        try:
            return SampleMap("loop", "SWAGModule")(run_sample, chunk, {}, inputs)
        finally:
            for name, shard in shards.items():
                shard.copy_(trained[name])


def _identity(value: Any) -> Any:
    return value


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device
