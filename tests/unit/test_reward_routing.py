"""Which reward scores a row: ``reward.by_data_source``, ``reward.default`` and the Reward protocol."""

from __future__ import annotations

import pytest

from async_rl.config import RewardConfig
from async_rl.config_io import ConfigError, load_config
from async_rl.rewards import code, math
from async_rl.rewards.base import Reward, load_reward
from async_rl.rewards.pool import RewardPool


def test_code_sources_route_to_the_code_reward_and_the_rest_to_the_default():
    cfg = RewardConfig()
    assert cfg.reward_for("livecodebench_v5") == "code"
    assert cfg.reward_for("LiveCodeBench") == "code"
    assert cfg.reward_for("taco") == cfg.reward_for("apps/interview") == cfg.reward_for("codecontests") == "code"
    assert cfg.reward_for("synthetic/arith") == cfg.reward_for("aime24") == cfg.reward_for("math_dapo") == "math"


def test_the_longest_matching_key_wins():
    cfg = RewardConfig(by_data_source={"code": "code", "code_golf": "math"})
    assert cfg.reward_for("code_golf_v2") == "math"
    assert cfg.reward_for("codeforces") == "code"


def test_an_unmapped_source_without_a_default_is_one_clear_error():
    cfg = RewardConfig(by_data_source={"aime": "math"}, default=None)
    assert cfg.reward_for("aime24") == "math"
    with pytest.raises(ValueError) as err:
        cfg.reward_for("gsm8k")
    message = str(err.value)
    assert message.startswith("data_source='gsm8k': no reward.by_data_source key matches it")
    assert "\n" not in message


def test_a_reward_name_without_a_module_fails_at_load_naming_the_key():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["reward.by_data_source={arith: chess}"])
    assert str(err.value).startswith("reward.by_data_source: arith: 'chess' is not a reward")
    with pytest.raises(ConfigError, match=r"^reward.default='pool': 'pool' is not a reward"):
        load_config("tiny", ["reward.default=pool"])


def test_the_math_and_code_modules_satisfy_the_reward_protocol():
    assert isinstance(math, Reward) and isinstance(code, Reward)
    assert load_reward("math") is math and load_reward("code") is code
    with pytest.raises(ValueError, match="expected async_rl/rewards/base.py with score"):
        load_reward("base")
    with pytest.raises(ValueError):
        load_reward("../math")


def test_the_pool_scores_a_row_with_the_reward_its_data_source_maps_to():
    with RewardPool(RewardConfig(workers=1, by_data_source={"arith": "math"}, default=None)) as pool:
        record = pool.submit_for("arith/train", "\\boxed{4}", "4").result()
        assert (record.status, record.score) == ("correct", 1.0)
        with pytest.raises(ValueError, match="data_source='trivia'"):
            pool.submit_for("trivia", "\\boxed{4}", "4")


def test_a_training_source_without_a_reward_stops_the_job_before_sft_and_ray(tmp_path):
    import json

    from async_rl.job.driver import _check_train_data
    from async_rl.tasks.dataset import DatasetError

    row = {"data_source": "trivia", "prompt": [{"role": "user", "content": "Capital of France?"}],
           "reward_model": {"ground_truth": "Paris"}, "extra_info": {}}
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(row) + "\n")
    cfg = load_config("tiny", [f"data.train={data}", f"run.dir={tmp_path / 'run'}"])
    _check_train_data(cfg, tmp_path / "run")  # the default reward (math) takes it
    strict = load_config("tiny", [f"data.train={data}", "reward.default=null"])
    with pytest.raises(DatasetError, match=r"^data_source='trivia': no reward.by_data_source key matches it"):
        _check_train_data(strict, tmp_path / "run")
