import pytest
import yaml

from async_rl.config import Config
from async_rl.config_io import ConfigError, dump_config, load_config, resolve_config_path


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
    assert klear.learner.lr == 1e-6 and klear.learner.weight_decay == 0.1
    assert klear.learner.groups_per_step == 128 and klear.actors.n_samples_per_prompt == 8
    assert klear.algorithm.sft_coef == 0.1 and klear.algorithm.kl_coef == 0.0


def test_dotted_overrides_are_typed_by_yaml():
    cfg = load_config("tiny", ["learner.lr=1e-6", "actors.count=4", "actors.stop=['x', 'y']", "buffer.fsync=never"])
    assert cfg.learner.lr == 1e-6
    assert cfg.actors.count == 4
    assert cfg.actors.stop == ["x", "y"]
    assert cfg.buffer.fsync == "never"


def test_out_of_range_value_names_key_value_and_bound():
    assert error_of("learner.zero_stage=4") == "learner.zero_stage=4: must be 0, 1, 2 or 3"
    assert error_of("buffer.max_staleness=-1") == "buffer.max_staleness=-1: must be >= 0"
    assert error_of("learner.micro_batch_tokens=0") == "learner.micro_batch_tokens=0: must be > 0"
    assert error_of("algorithm.loss.eps_low=1.5") == "algorithm.loss.eps_low=1.5: must be < 1"


def test_unknown_key_suggests_the_close_match():
    message = error_of("learner.lrr=0.1")
    assert message.startswith("learner.lrr: unknown key")
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
    assert "multiple of learner.mini_batches_per_step" in error_of("learner.mini_batches_per_step=3")
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
    cfg = load_config("klear-math-8b", ["learner.lr=3e-6"])
    again = Config.model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                yield from walk(annotation)
            else:
                yield f"{model.__name__}.{name}", field.description

    missing = [name for name, doc in walk(Config) if not doc]
    assert missing == []


def test_recipe_names_resolve_to_files():
    assert resolve_config_path("tiny").name == "tiny.yaml"
    assert resolve_config_path(None).name == "tiny.yaml"
