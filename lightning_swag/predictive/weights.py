"""The weight stream: chunks of weight samples of one or more posteriors, as the model's tensors.

Sample ``i`` of posterior ``j`` is sample ``i`` of the seed ``derive_seed(run seed, j)``, drawn with
the posterior's ``sample_weights`` (the :class:`~lightning_swag.posterior.protocol.Posterior`
protocol, which fixes a sample by its seed and index), so neither the chunking nor the batches change
it. Each chunk is ``{name inside the model: [n, *shape]}`` on the model's device, every tensor in its
own parameter's dtype (a sharded SWAG posterior gives this process's model tensors: a DDP slice joins
the columns of all processes, a collective; FSDP2 shards stay local). When all samples fit in
:data:`CACHE_BYTES` (and no ``chunk_size`` below ``num_samples`` bounds the memory to one chunk) they
are kept for the next batch of the same run. Plain torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_swag.posterior.noise import derive_seed
from lightning_swag.posterior.parameters import canonical_name
from lightning_swag.posterior.protocol import Posterior, num_weights

__all__ = ["CACHE_BYTES", "CHUNK_BYTES", "SamplingSpec", "WeightStream", "draw_run_seed"]

CHUNK_BYTES = 256 * 2**20
"""Upper bound on the bytes of one chunk of sampled weights, used to pick a chunk size."""
CACHE_BYTES = 512 * 2**20
"""Weight samples of a run are kept between batches when all of them fit in this many bytes; larger
sets are redrawn from the same seed for every batch."""

Chunk = dict[str, Tensor]


@dataclass(frozen=True)
class SamplingSpec:
    """What fixes the weight samples of a run (with the run seed and the posteriors: SWAG-Diagonal is
    the posterior ``SWAGPosterior.diagonal()``, not an option here)."""

    num_samples: int
    scale: float
    chunk_size: int | None


def draw_run_seed(shared: bool) -> int:
    """A fresh seed from the global RNG (never reseeded). ``shared``: when several processes run, all
    get global rank 0's (a collective), since their samples, or their parts of samples, must match."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    if shared and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = int(box[0])
    return seed


class WeightStream:
    """Chunks of weight samples of ``posteriors`` for ``model`` (see the module docstring).

    Args:
        posteriors: the posterior(s) (several for MultiSWAG), each fitting ``model``.
        model: the network the samples are for (names, dtypes and device are read from it).
    """

    def __init__(self, posteriors: Sequence[Posterior], model: nn.Module) -> None:
        self.posteriors = list(posteriors)
        named = dict(model.named_parameters())
        self._names = {canonical_name(n): n for n in named}
        self._dtypes = {n: p.dtype for n, p in named.items()}
        first = next(iter(named.values()))
        self.device = first.device
        tracked = {self._names[n] for post in self.posteriors for n in post.param_shapes}
        # float64 samples for a float64 model, float32 otherwise; each tensor is then cast to its own
        # parameter's dtype (a bf16 backbone beside an fp32 head keeps both).
        self.draw_dtype = (
            torch.float64 if any(self._dtypes[n] == torch.float64 for n in tracked) else torch.float32
        )
        self._drawn: tuple[Hashable, list[Chunk]] | None = None
        self._prepared: tuple[Hashable, list[Chunk]] | None = None

    def model_name(self, canonical: str) -> str:
        """The name inside the model of the parameter a posterior calls ``canonical``."""
        return self._names[canonical]

    def model_dtype(self, canonical: str) -> torch.dtype:
        """The dtype of that parameter in the model."""
        return self._dtypes[self._names[canonical]]

    @property
    def tracked_names(self) -> list[str]:
        """The names inside the model of the parameters any posterior tracks (MultiSWAG posteriors may
        track different sets), in the model's order."""
        tracked = {self._names[n] for post in self.posteriors for n in post.param_shapes}
        return [n for n in self._dtypes if n in tracked]

    def chunk_size(self, post: Posterior, spec: SamplingSpec) -> int:
        """Samples of ``post`` drawn at once: ``spec.chunk_size``, else as many as fit :data:`CHUNK_BYTES`."""
        if spec.chunk_size is not None:
            return spec.chunk_size
        budget = CHUNK_BYTES // (self.draw_dtype.itemsize * num_weights(post))
        return max(1, min(spec.num_samples, budget))

    def num_chunks(self, spec: SamplingSpec) -> int:
        """Chunks of a run, all posteriors together."""
        return sum(math.ceil(spec.num_samples / self.chunk_size(post, spec)) for post in self.posteriors)

    def total_bytes(self, spec: SamplingSpec) -> int:
        """Bytes of all samples of a run (whole weight vectors, in the draw dtype)."""
        return (
            self.draw_dtype.itemsize * spec.num_samples * sum(num_weights(post) for post in self.posteriors)
        )

    def fits_cache(self, spec: SamplingSpec) -> bool:
        """Whether the run's samples are kept between batches: they fit :data:`CACHE_BYTES`, and no
        explicit ``chunk_size`` smaller than ``num_samples`` asks for memory bounded by one chunk."""
        bounded = spec.chunk_size is not None and spec.chunk_size < spec.num_samples
        return not bounded and self.total_bytes(spec) <= CACHE_BYTES

    def chunks(
        self,
        spec: SamplingSpec,
        run_seed: int,
        prepare: Callable[[Chunk], Chunk] | None = None,
        progress: Callable[[Iterator[Chunk], int], Any] | None = None,
        key: Hashable = None,
    ) -> Sequence[Chunk] | Iterator[Chunk]:
        """The run's chunks, through ``prepare`` (e.g. a memory-layout change); cached when they fit.

        ``key`` names ``prepare`` in the cache key, with ``spec`` and ``run_seed``: any change of
        them draws new samples. The drawn chunks are cached before ``prepare`` too, so samples drawn
        once at the start of a run (``SampledPredictive.start_run``, where drawing joins the DDP
        slices, a collective) are prepared later without drawing again. ``progress(iterator,
        total)`` wraps the drawing (of a cached run once, else of every batch).
        """
        if self._prepared is not None and self._prepared[0] == (spec, run_seed, key):
            return self._prepared[1]
        if not self.fits_cache(spec):
            self.clear()
            drawn = self._draw_all(spec, run_seed)
            drawn = map(prepare, drawn) if prepare is not None else drawn
            return progress(drawn, self.num_chunks(spec)) if progress is not None else drawn
        if self._drawn is None or self._drawn[0] != (spec, run_seed):
            drawn = self._draw_all(spec, run_seed)
            if progress is not None:
                drawn = progress(drawn, self.num_chunks(spec))
            self._drawn, self._prepared = ((spec, run_seed), list(drawn)), None
        if prepare is None:
            return self._drawn[1]
        prepared = [prepare(chunk) for chunk in self._drawn[1]]
        self._drawn, self._prepared = None, ((spec, run_seed, key), prepared)  # one copy kept
        return prepared

    def clear(self) -> None:
        """Forget the cached samples."""
        self._drawn = None
        self._prepared = None

    def mean_weights(self) -> Chunk:
        """The posteriors' centres (sample 0 of seed 0 at ``scale=0``: a SWAG posterior's SWA mean) as a
        one-sample chunk of every tracked parameter (where posteriors share a parameter, the first
        one's)."""
        merged: Chunk = {}
        for post in reversed(self.posteriors):
            merged.update(self._draw(post, SamplingSpec(1, 0.0, 1), 0, 0))
        return merged

    def _draw_all(self, spec: SamplingSpec, run_seed: int) -> Iterator[Chunk]:
        for index, post in enumerate(self.posteriors):
            seed = derive_seed(run_seed, index)
            size = self.chunk_size(post, spec)
            for start in range(0, spec.num_samples, size):
                yield self._draw(
                    post, SamplingSpec(min(size, spec.num_samples - start), *_rest(spec)), seed, start
                )

    def _draw(self, post: Posterior, spec: SamplingSpec, seed: int, start: int) -> Chunk:
        parts = post.sample_weights(
            spec.num_samples,
            seed=seed,
            first_sample=start,
            scale=spec.scale,
            dtype=self.draw_dtype,
            device=self.device,
        )
        names, dtypes = self._names, self._dtypes
        return {names[n]: v.to(device=self.device, dtype=dtypes[names[n]]) for n, v in parts.items()}


def _rest(spec: SamplingSpec) -> tuple[float, int | None]:
    return spec.scale, spec.chunk_size
