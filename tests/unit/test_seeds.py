"""Every sample of a job draws from its own random stream; different job seeds are independent."""

from __future__ import annotations

import pytest

from actors.engine import VllmEngine
from actors.prompts import prompt_stream
from async_rl.config import ActorsConfig
from async_rl.seeds import SEED_MODULUS, SeedWindows, derive_seed
from async_rl.tasks.dataset import PromptRow


def engine_sampling(seed: int | None, *stream) -> VllmEngine:
    """A VllmEngine reduced to its sampling settings (no vLLM process behind it)."""
    engine = object.__new__(VllmEngine)
    engine._cfg = ActorsConfig(seed=seed, n_samples_per_prompt=8)
    engine._seeds = None
    engine.reseed(*stream)
    return engine


def vllm_child_seeds(params) -> list[int | None]:
    """The seeds vLLM gives the ``n`` samples of one request (its own expansion code)."""
    from vllm.v1.engine.parallel_sampling import ParentRequest

    parent = object.__new__(ParentRequest)
    parent.request_id, parent.sampling_params = "r", params
    parent.child_requests, parent.cached_child_sampling_params = set(), None
    return [parent.get_child_info(i)[1].seed for i in range(params.n)]


def test_a_step_of_16_groups_of_8_samples_uses_128_distinct_random_streams():
    engine = engine_sampling(0, 0, "actor-0")
    seeds = [s for _ in range(16) for s in vllm_child_seeds(engine.sampling_params(8))]
    assert len(seeds) == 128
    assert len(set(seeds)) == 128


def test_requests_of_different_sizes_never_share_a_stream():
    engine = engine_sampling(0, 0, "actor-0")
    seeds = [s for n in (8, 1, 8, 3, 8, 1) for s in vllm_child_seeds(engine.sampling_params(n))]
    assert len(set(seeds)) == len(seeds) == 29


def test_different_job_seeds_and_actors_sample_different_streams():
    first = [engine_sampling(0, run, actor).sampling_params(8).seed for run in (0, 1) for actor in (0, 1)]
    assert len(set(first)) == 4
    again = engine_sampling(0, 1, 0).sampling_params(8).seed
    assert again == first[2]  # reproducible: same stream name, same seeds


def test_an_unseeded_config_leaves_sampling_unseeded():
    assert engine_sampling(None, 0, "actor-0").sampling_params(8).seed is None


def test_seed_windows_never_run_past_the_largest_seed():
    windows = SeedWindows(SEED_MODULUS - 5)
    assert windows.take(4) == SEED_MODULUS - 5
    assert windows.take(4) == 0  # the next window would pass 2^31 - 1: it starts over
    assert windows.take(2) == 4
    with pytest.raises(ValueError, match="n=0"):
        windows.take(0)


def test_derived_seeds_are_stable_and_distinct_per_stream():
    assert derive_seed("prompts", 0, 0, 1) == derive_seed("prompts", 0, 0, 1)
    names = [("prompts", run, 0, actor) for run in range(3) for actor in range(3)]
    assert len({derive_seed(*n) for n in names}) == 9
    assert derive_seed("a", 1) != derive_seed("a", "1")
    assert 0 <= derive_seed("x") < 2**63


def test_different_job_seeds_give_independent_prompt_orders():
    rows = [PromptRow(prompt_id=str(i), messages=[], ground_truth="0", data_source="d", extra_info={})
            for i in range(50)]

    def order(run_seed: int) -> list[str]:
        stream = prompt_stream(rows, seed=derive_seed("prompts", run_seed, 0, 0))
        return [next(stream).prompt_id for _ in range(50)]

    a, b = order(0), order(1)
    assert sorted(a) == sorted(b)
    assert a != b
    # Not a rotation or shift of one another: few positions agree (about 1 by chance).
    assert sum(x == y for x, y in zip(a, b)) < 6
