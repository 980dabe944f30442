"""Optional Ray backend: candidate blocks scored in parallel, one actor per GPU (or CPU slot), each holding the model.

Scoring candidates is embarrassingly parallel: each actor gets a share of the candidate blocks for the current step,
scores them on its own copy of the calibration data with the same prefix-reuse walk as the local backend, and sends
back per-request scores. The driver computes the losses and picks the block, exactly as it does locally.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import PuddingError
from .omission import OmissionSet


def _ray():
    try:
        import ray
    except ImportError:
        raise PuddingError("the Ray backend needs Ray: pip install 'pudding[ray]'") from None
    return ray


class CandidateWorker:
    """Holds a model and the prepared calibration requests; scores the candidates it is given."""

    def __init__(self, model: str, device: str, dtype: str, batch_tokens: int | None, groups) -> None:
        from .models import load_decoder
        from .scoring import Scorer

        loaded = load_decoder(model, device, dtype)
        self.scorer = Scorer(loaded.decoder, loaded.tokenizer, max_batch_tokens=batch_tokens)
        self.prepared = self.scorer.prepare(groups)

    def score(self, base: Sequence[int], num_blocks: int, candidates: Sequence[int]):
        from .search import candidate_scores

        return candidate_scores(self.scorer, self.prepared, OmissionSet(base, num_blocks), candidates)


class RayEvaluator:
    """Drop-in for the local candidate evaluator of `search.greedy_search`."""

    def __init__(self, model: str, calibration, workers: int | None = None, device: str = "cuda", dtype: str = "auto",
                 batch_tokens: int | None = None, address: str | None = None) -> None:
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        on_gpu = device.startswith("cuda")
        if on_gpu and gpus == 0:
            raise PuddingError("the Ray cluster has no GPUs: pass --device cpu to run actors on CPUs")
        count = workers or (gpus if on_gpu else 1)
        remote = ray.remote(num_gpus=1 if on_gpu else 0, num_cpus=1)(CandidateWorker)
        self.ray = ray
        self.actors = [remote.remote(model, device, dtype, batch_tokens, calibration.groups) for _ in range(count)]

    def __call__(self, base: OmissionSet, candidates: Sequence[int], advance=None):
        shares = [list(candidates)[i :: len(self.actors)] for i in range(len(self.actors))]
        futures = [a.score.remote(list(base), base.num_blocks, s) for a, s in zip(self.actors, shares) if s]
        merged = {}
        for part in self.ray.get(futures):
            merged.update(part)
        return merged

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
