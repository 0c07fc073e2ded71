import typing

import pytest
import yaml

from async_rl.config import Config
from async_rl.config_io import ConfigError, dump_config, load_config, resolve_config_path
from learners.objectives import ObjectiveConfig


def error_of(*overrides, config="tiny"):
    with pytest.raises(ConfigError) as info:
        load_config(config, list(overrides))
    return str(info.value)


def test_embedded_default_and_klear_recipe_validate():
    tiny = load_config(None)
    klear = load_config("klear-math-8b")
    assert tiny.model.size == "tiny" and tiny.actors.count == 1
    assert klear.algorithm.loss.type == "gppo"
    assert (klear.algorithm.loss.eps_low, klear.algorithm.loss.eps_high) == (0.2, 0.28)
    assert klear.algorithm.loss.dual_clip_c == 10.0
    assert klear.learner.optimizer.lr == 1e-6 and klear.learner.optimizer.weight_decay == 0.1
    assert klear.learner.batch.groups_per_step == 128 and klear.actors.n_samples_per_prompt == 8
    assert klear.reward.math.require_think_format and klear.algorithm.staleness.max_staleness == 8
    assert klear.algorithm.sft_coef == 0.1 and klear.algorithm.kl_coef == 0.0


def test_dotted_overrides_are_typed_by_yaml():
    cfg = load_config("tiny", ["learner.optimizer.lr=1e-6", "actors.count=4", "actors.stop=['x', 'y']", "buffer.fsync=never"])
    assert cfg.learner.optimizer.lr == 1e-6
    assert cfg.actors.count == 4
    assert cfg.actors.stop == ["x", "y"]
    assert cfg.buffer.fsync == "never"


def test_out_of_range_value_names_key_value_and_bound():
    assert error_of("learner.zero_stage=4") == "learner.zero_stage=4: must be 0, 1, 2 or 3"
    assert error_of("algorithm.staleness.max_staleness=-1") == "algorithm.staleness.max_staleness=-1: must be >= 0"
    assert error_of("learner.batch.micro_batch_tokens=0") == "learner.batch.micro_batch_tokens=0: must be > 0"
    assert error_of("algorithm.loss.eps_low=1.5") == "algorithm.loss.eps_low=1.5: must be < 1"


def test_unknown_key_suggests_the_close_match():
    message = error_of("learner.optimizer.lrr=0.1")
    assert message.startswith("learner.optimizer.lrr: unknown key")
    assert "did you mean 'lr'?" in message


def test_unknown_section_lists_the_sections():
    message = error_of("nonsense.x=1")
    assert message.startswith("nonsense: unknown key")
    assert "learner" in message


def test_wrong_type_names_the_key_and_value():
    message = error_of("actors.temperature=abc")
    assert message.startswith("actors.temperature='abc': ")
    assert "number" in message


def test_literal_lists_the_allowed_values():
    message = error_of("algorithm.loss.type=foo")
    assert message.startswith("algorithm.loss.type='foo': must be one of")
    assert "'gppo'" in message and "'cispo'" in message


def test_cross_field_checks():
    assert "actors.max_tokens=5000 must be below model.max_model_len=256" in error_of("actors.max_tokens=5000")
    assert "multiple of learner.batch.mini_batches_per_step" in error_of("learner.batch.mini_batches_per_step=3")
    assert "min_digits=5 > max_digits=3" in error_of("data.synth.max_digits=3", "data.synth.min_digits=5")


def test_public_bind_requires_curve_keys():
    message = error_of("cluster.bind_host=10.0.0.7")
    assert message.startswith("cluster.bind_host=10.0.0.7")
    assert "curve_keys_dir" in message


@pytest.mark.parametrize(("override", "field"), [
    ("weights.host=0.0.0.0", "weights.host=0.0.0.0"),
    ("cluster.bind_host=0.0.0.0", "cluster.bind_host=0.0.0.0"),
    ("buffer.host=[::]", "buffer.host=[::]"),
    ("weights.endpoint=tcp://0.0.0.0:5555", "weights.endpoint=0.0.0.0"),
])
def test_a_wildcard_is_refused_even_with_keys_because_peers_are_given_the_address(override, field):
    message = error_of(override, "weights.curve_keys_dir=keys")
    assert message.startswith(f"{field}: a wildcard binds every interface but cannot be given to peers")


def test_bind_host_auto_is_loopback_for_a_private_ray_and_needs_keys_on_a_cluster():
    assert load_config("tiny", ["cluster.bind_host=auto"]).cluster.bind_host == "127.0.0.1"
    message = error_of("cluster.bind_host=auto", "cluster.ray_address=auto")
    assert message.startswith("cluster.bind_host=auto: off loopback every listener requires CURVE keys")
    cfg = load_config("tiny", ["cluster.bind_host=auto", "cluster.ray_address=auto", "weights.curve_keys_dir=keys"])
    assert cfg.cluster.bind_host == "auto" and cfg.weights.host is None


@pytest.mark.parametrize(("override", "field"), [
    ("weights.host=10.1.2.4", "weights.host=10.1.2.4"),
    ("buffer.host=10.1.2.3", "buffer.host=10.1.2.3"),
    ("weights.endpoint=tcp://10.1.2.5:5555", "weights.endpoint=10.1.2.5"),
    ("cluster.bind_host=node7.example", "cluster.bind_host=node7.example"),
])
def test_every_listener_off_loopback_requires_curve_keys(override, field):
    message = error_of(override)
    assert message.startswith(f"{field}: off loopback every listener requires CURVE keys")
    assert "\n" not in message
    assert load_config("tiny", [override, "weights.curve_keys_dir=keys"]).weights.curve_keys_dir == "keys"


@pytest.mark.parametrize("host", ["localhost", "::1", "127.0.0.2"])
def test_every_loopback_name_binds_127_0_0_1_so_the_learners_rendezvous_through_a_file(host):
    from learners.launch import rendezvous_file

    bind_host = load_config("tiny", [f"cluster.bind_host={host}"]).cluster.bind_host
    assert bind_host == ("127.0.0.2" if host.startswith("127.") else "127.0.0.1")
    assert rendezvous_file(host) != "" and rendezvous_file(bind_host) != ""
    assert rendezvous_file("0.0.0.0") == ""


def test_malformed_override_and_missing_file():
    assert "expected KEY.PATH=VALUE" in error_of("=3")
    assert "no such file or recipe" in error_of(config="does-not-exist")


def test_invalid_yaml_reports_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learner:\n  lr: [1,\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: invalid YAML at line")


def test_dump_round_trips_to_the_same_config():
    cfg = load_config("klear-math-8b", ["learner.optimizer.lr=3e-6"])
    again = Config.model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                yield from walk(annotation)
            elif name != "type" or not issubclass(model, ObjectiveConfig):  # the tag: see algorithm.loss
                yield f"{model.__name__}.{name}", field.description
            for member in typing.get_args(annotation):  # the objectives of algorithm.loss
                variant = (typing.get_args(member) or (member,))[0]
                if isinstance(variant, type) and issubclass(variant, ObjectiveConfig):
                    yield from walk(variant)

    missing = [name for name, doc in walk(Config) if not doc]
    assert missing == []


def test_recipe_names_resolve_to_files():
    assert resolve_config_path("tiny").name == "tiny.yaml"
    assert resolve_config_path(None).name == "tiny.yaml"


# --------------------------------------------------------------------------- moved keys


@pytest.mark.parametrize(("override", "message"), [
    ("buffer.max_staleness=4", "buffer.max_staleness moved to algorithm.staleness.max_staleness"),
    ("learner.lr=1e-6", "learner.lr moved to learner.optimizer.lr"),
    ("learner.groups_per_step=4", "learner.groups_per_step moved to learner.batch.groups_per_step"),
    ("learner.sft_lr=0.01", "learner.sft_lr moved to learner.sft.lr"),
    ("learner.checkpoint_every=5", "learner.checkpoint_every moved to learner.checkpoint.every"),
    ("reward.code_soft=false", "reward.code_soft moved to reward.code.soft"),
    ("reward.require_think_format=true", "reward.require_think_format moved to reward.math.require_think_format"),
    ("algorithm.staleness_schedule.kappa=1", "algorithm.staleness_schedule moved to algorithm.staleness.schedule"),
])
def test_a_moved_key_names_its_new_place_in_one_line(override, message):
    assert error_of(override) == message


def test_a_moved_key_in_a_yaml_file_names_its_new_place(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("learner:\n  eval_every: 5\n")
    with pytest.raises(ConfigError, match=r"^learner.eval_every moved to learner.eval.every$"):
        load_config(path)


def test_every_moved_key_lands_on_a_field_of_the_tree():
    from async_rl.config_io import MOVED_KEYS

    for new in MOVED_KEYS.values():
        node = Config()
        for part in new.split("."):
            node = getattr(node, part)


# --------------------------------------------------------------------------- objectives


def test_a_field_of_another_objective_is_an_error_naming_the_objective():
    message = error_of("algorithm.loss.cispo_two_sided=true")
    assert message.startswith("algorithm.loss.cispo_two_sided: not a field of the gppo objective")
    assert "beta1" in message and "\n" not in message
    message = error_of("algorithm.loss={type: reinforce_tis, eps_low: 0.1}")
    assert message.startswith("algorithm.loss.eps_low: not a field of the reinforce_tis objective")


def test_each_objective_keeps_its_own_fields_and_a_loss_without_type_is_gppo(tmp_path):
    cfg = load_config("tiny", ["algorithm.loss={type: cispo, eps_high: 0.5, cispo_two_sided: true}"])
    assert (cfg.algorithm.loss.type, cfg.algorithm.loss.eps_high, cfg.algorithm.loss.cispo_two_sided) == (
        "cispo", 0.5, True)
    path = tmp_path / "untyped.yaml"
    path.write_text("algorithm:\n  loss: {eps_low: 0.1, beta1: 0.5}\n")
    loss = load_config(path).algorithm.loss
    assert (loss.type, loss.eps_low, loss.beta1, loss.eps_high) == ("gppo", 0.1, 0.5, 0.28)
    assert error_of("algorithm.loss={type: ppo, eps_low: 2}") == "algorithm.loss.eps_low=2: must be < 1"


def test_loading_the_config_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, async_rl.config_io as c; c.load_config('tiny'); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --------------------------------------------------------------------------- checks at load time


def test_a_kl_penalty_is_refused_at_load():
    message = error_of("algorithm.kl_coef=0.1")
    assert message.startswith("algorithm.kl_coef=0.1: a KL penalty needs reference-policy logprobs")


def test_a_cosine_schedule_without_a_horizon_is_refused_at_load():
    message = error_of("learner.optimizer.lr_schedule=cosine", "learner.max_steps=0")
    assert message == "learner.optimizer.lr_schedule=cosine needs learner.max_steps > 0 (the decay horizon)"
    assert load_config("tiny", ["learner.optimizer.lr_schedule=cosine"]).learner.max_steps == 60


def test_staleness_schedule_bounds_are_checked_at_load():
    message = error_of("algorithm.staleness.schedule.eps_min=0.5", "algorithm.staleness.schedule.eps_max=0.1")
    assert message == "algorithm.staleness.schedule: eps_min=0.5 > eps_max=0.1: min must be <= max"


def test_sft_uses_the_rl_optimizer_with_its_own_lr_and_a_cosine_decay():
    learner = load_config("tiny").learner
    sft = learner.sft_optimizer
    assert (sft.lr, sft.lr_schedule) == (learner.sft.lr, "cosine")
    assert sft.model_dump(exclude={"lr", "lr_schedule"}) == learner.optimizer.model_dump(exclude={"lr", "lr_schedule"})
    assert learner.optimizer.lr == 5e-5 and learner.optimizer.lr_schedule == "constant"


def test_buffer_sampler_choices_are_the_samplers_map():
    """A sampler added to buffer/samplers.py is a valid buffer.sampler with no config edit."""
    from pydantic import ValidationError

    from async_rl.config import BufferConfig
    from buffer.samplers import SAMPLERS

    choices = typing.get_args(BufferConfig.model_fields["sampler"].annotation)
    assert set(choices) == set(SAMPLERS)
    assert all(name in BufferConfig.model_fields["sampler"].description for name in SAMPLERS)
    with pytest.raises(ValidationError):
        BufferConfig(sampler="lifo")
