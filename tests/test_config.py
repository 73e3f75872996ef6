"""Settings precedence: file < environment < flags, and clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gpuserve.config import ModelSettings, Settings, describe_error

from .helpers import DEMO, ROOT


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "gpuserve.toml"
    path.write_text(
        'port = 9000\ndevice = "cpu"\n'
        '[model]\npath = "m.pt2"\nmax_batch_size = 8\nmax_wait_ms = 1.5\n'
    )
    return path


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "GPUSERVE_PORT",
        "GPUSERVE_CONFIG_FILE",
        "GPUSERVE_DEVICE",
        "GPUSERVE_MODEL__MAX_BATCH_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)


def test_defaults_need_no_file_and_name_no_model() -> None:
    settings = Settings()
    assert settings.port == 8000 and settings.host == "127.0.0.1" and settings.device == "auto"
    assert settings.model is None and settings.models is None
    assert settings.served_models == []
    named = Settings(model={"path": "models/digits.pt2"})
    assert named.model is not None
    assert named.model.spec_source() == Path("models/digits.json")
    assert [model.key for model in named.served_models] == ["digits"]


def test_file_values_are_read(config_file: Path) -> None:
    settings = Settings(config_file=config_file)
    assert settings.port == 9000 and settings.device == "cpu"
    assert settings.model.max_batch_size == 8 and settings.model.max_wait_ms == 1.5


def test_environment_beats_file_and_flags_beat_both(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUSERVE_PORT", "9100")
    monkeypatch.setenv("GPUSERVE_MODEL__MAX_BATCH_SIZE", "16")
    from_env = Settings(config_file=config_file)
    assert from_env.port == 9100
    assert from_env.model.max_batch_size == 16
    assert from_env.model.max_wait_ms == 1.5  # nested keys merge: the file's other values stay
    assert Settings(config_file=config_file, port=9200).port == 9200


def test_config_file_can_come_from_the_environment(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUSERVE_CONFIG_FILE", str(config_file))
    assert Settings().port == 9000


def test_environment_is_read_when_settings_are_built_not_at_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().port == 8000
    monkeypatch.setenv("GPUSERVE_PORT", "8111")
    assert Settings().port == 8111


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config file not found"):
        Settings(config_file=tmp_path / "nope.toml")


def test_invalid_toml_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 3")
    with pytest.raises(ValueError, match="not valid TOML"):
        Settings(config_file=bad)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:", ""])
def test_bad_device_is_rejected(device: str) -> None:
    with pytest.raises(ValidationError, match="device must be"):
        Settings(device=device)


def test_device_is_normalised() -> None:
    assert Settings(device=" CUDA:1 ").device == "cuda:1"


def test_unknown_keys_are_rejected(tmp_path: Path) -> None:
    typo = tmp_path / "typo.toml"
    typo.write_text("[model]\nmax_batch = 4\n")
    with pytest.raises(ValidationError, match="max_batch"):
        Settings(config_file=typo)


def test_out_of_range_values_are_rejected() -> None:
    with pytest.raises(ValidationError):
        ModelSettings(path=DEMO, max_batch_size=0)
    with pytest.raises(ValidationError):
        Settings(port=70000)


def test_explicit_spec_path_wins() -> None:
    assert ModelSettings(path=Path("a.pt2"), spec=Path("b.json")).spec_source() == Path("b.json")


def test_the_shipped_config_loads() -> None:
    settings = Settings(config_file=ROOT / "configs" / "default.toml")
    assert settings.model.path == ROOT / "models" / "digits.pt2"  # relative to configs/
    assert settings.model.max_queue_size == 2048 and settings.api_keys == []


@pytest.mark.parametrize(
    ("max_batch", "sizes"),
    [(1, (1,)), (32, (1, 2, 4, 8, 16, 32)), (24, (1, 2, 4, 8, 16, 24))],
)
def test_warm_up_covers_each_power_of_two_bucket(max_batch: int, sizes: tuple[int, ...]) -> None:
    assert ModelSettings(path=DEMO, max_batch_size=max_batch).warmup_batch_sizes == sizes


def test_precision_is_one_of_three() -> None:
    assert ModelSettings(path=DEMO, precision="bf16").precision == "bf16"
    with pytest.raises(ValidationError):
        ModelSettings(path=DEMO, precision="int8")  # type: ignore[arg-type]


def test_several_models_come_from_a_toml_list(tmp_path: Path) -> None:
    path = tmp_path / "multi.toml"
    path.write_text(
        'default_model = "b"\n'
        '[[models]]\nname = "a"\npath = "a.pt2"\n'
        '[[models]]\nname = "b"\nfactory = "pkg.mod:build"\ndevice = "CPU"\n'
        '[models.spec]\ninput = { shape = [-1], dtype = "int64", max_shape = [8] }\n'
        "output = { shape = [2] }\n"
    )
    settings = Settings(config_file=path)
    assert [model.key for model in settings.served_models] == ["b", "a"]  # the default first
    factory_model = settings.served_models[0]
    assert factory_model.path is None and factory_model.device == "cpu"
    assert isinstance(factory_model.spec, dict)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"path": Path("a.pt2"), "factory": "m:f"}, "either path"),
        ({"weights": Path("w.safetensors")}, "weights need a factory"),
        ({"factory": "m:f"}, "needs a name"),
        ({"factory": "not an import path", "name": "x"}, "pattern"),
        ({"path": Path("a.pt2"), "device": "tpu"}, "device must be"),
        ({"path": Path("a.pt2"), "length_buckets": [8, 4]}, "strictly increasing"),
        (
            {"path": Path("a.pt2"), "spec": {"input": {"shape": [0]}, "output": {"shape": [1]}}},
            "inline spec",
        ),
        ({"name": "x", "max_batch_size": 4}, "needs a path, a factory or a handler"),
    ],
)
def test_a_model_entry_that_cannot_work_is_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelSettings.model_validate(fields)


def test_model_names_must_be_unique_and_the_default_must_exist() -> None:
    twins = [ModelSettings(path=Path("x/a.pt2")), ModelSettings(path=Path("y/a.pt2"))]
    with pytest.raises(ValidationError, match="unique"):
        Settings(models=twins)
    with pytest.raises(ValidationError, match="default_model 'c'"):
        Settings(models=twins[:1], default_model="c")


def test_versions_of_one_name_are_unique_and_a_default_version_must_exist() -> None:
    one, two = (
        ModelSettings(path=DEMO, name="m", version=1),
        ModelSettings(path=DEMO, name="m", version=2),
    )
    both = Settings(models=[one, two], default_versions={"m": 2})
    assert [(m.key, m.version) for m in both.served_models] == [("m", 1), ("m", 2)]
    assert two.title == "m v2" and one.title == "m"
    with pytest.raises(ValidationError, match="unique: m version 2"):
        Settings(models=[one, two, two])
    with pytest.raises(ValidationError, match="default_versions: no model 'm' version 3"):
        Settings(models=[one, two], default_versions={"m": 3})
    with pytest.raises(ValidationError, match="version"):
        ModelSettings(path=DEMO, name="m", version=0)


def test_every_setting_is_in_the_reference_and_the_default_config() -> None:
    """The settings reference cannot drift from the settings class: a new field fails here until
    docs/configuration.md's table and configs/default.toml (a key, or a commented example)
    both list it."""
    import re

    from gpuserve.config import RaySettings

    readme = (ROOT / "docs" / "configuration.md").read_text()
    default_toml = (ROOT / "configs" / "default.toml").read_text()
    ray_toml = (ROOT / "configs" / "ray.toml").read_text()
    structural = {"config_file", "model", "models", "ray"}  # sections, not values
    missing = []
    for cls, prefix, config in (
        (Settings, "", default_toml),
        (ModelSettings, "model.", default_toml),
        (RaySettings, "", ray_toml),
    ):
        for name in set(cls.model_fields) - structural:
            in_readme = f"`{prefix}{name}`" in readme
            in_config = re.search(rf"^#?\s*{name}\s*=", config, re.M) is not None
            if not (in_readme and in_config):
                missing.append(f"{prefix}{name}: reference {in_readme}, config {in_config}")
    assert not missing, missing


def test_relative_paths_in_a_config_file_are_taken_from_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "deploy"
    folder.mkdir()
    config = folder / "gpuserve.toml"
    config.write_text(
        '[[models]]\nname = "a"\npath = "artifacts/a.pt2"\nspec = "../specs/a.json"\n'
        '[[models]]\nname = "b"\nfactory = "m:build"\ncode_dir = "."\n'
        'weights = "w.safetensors"\n'
        f'[[models]]\nname = "c"\npath = "{tmp_path / "abs.pt2"}"\n'
        '[[models]]\nname = "d"\nfactory = "m:build"\nspec = { input = { shape = [2] }, '
        "output = { shape = [1] } }\n"
    )
    monkeypatch.chdir(tmp_path.parent)  # anywhere but the config's folder
    a, b, c, d = Settings(config_file=config).models
    assert a.path == folder / "artifacts" / "a.pt2"
    assert a.spec == tmp_path / "specs" / "a.json"
    assert b.code_dir == folder and b.weights == folder / "w.safetensors"
    assert c.path == tmp_path / "abs.pt2"
    assert isinstance(d.spec, dict)
    # A flag or the environment is the user's own typing: from the working directory.
    monkeypatch.setenv("GPUSERVE_MODEL__PATH", "here.pt2")
    single = folder / "single.toml"
    single.write_text('[model]\npath = "x.pt2"\n')
    assert Settings(config_file=single).model.path == Path("here.pt2")


def test_a_settings_error_names_where_the_value_came_from(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file.write_text(
        'port = 9000\n[model]\npath = "m.pt2"\nmax_batch_size = 0\n[ray]\nnum_cpus = -1\n'
    )
    monkeypatch.setenv("GPUSERVE_DEVICE", "tpu")
    flags = {"config_file": config_file, "port": -3}
    with pytest.raises(ValidationError) as caught:
        Settings(**flags)
    lines = describe_error(caught.value, flags, {"GPUSERVE_DEVICE": "tpu"}).splitlines()
    assert any(line.startswith("  port (flag --port): ") for line in lines), lines
    assert any(
        line.startswith("  device (environment variable GPUSERVE_DEVICE): ") for line in lines
    ), lines
    assert any(
        line.startswith(
            f"  model.max_batch_size (config file {config_file}, key model.max_batch_size): "
        )
        for line in lines
    ), lines
    assert any(line.startswith(f"  ray.num_cpus (config file {config_file}, ") for line in lines)
    assert all("pydantic.dev" not in line for line in lines)


def test_an_error_in_a_list_of_models_names_the_entry(config_file: Path) -> None:
    config_file.write_text('[[models]]\nname = "a"\npath = "a.pt2"\nmax_wait_ms = -1\n')
    flags = {"config_file": config_file}
    with pytest.raises(ValidationError) as caught:
        Settings(**flags)
    (line,) = describe_error(caught.value, flags, {}).splitlines()
    assert line.startswith(
        f"  models[0].max_wait_ms (config file {config_file}, key models[0].max_wait_ms): "
    )


def test_the_repository_folder_in_a_config_file_is_taken_from_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    config = folder / "gpuserve.toml"
    config.write_text('repository_api = true\nrepository_dir = "../models"\n')
    monkeypatch.chdir(tmp_path.parent)
    assert Settings(config_file=config).repository_dir == tmp_path / "models"
    monkeypatch.setenv("GPUSERVE_REPOSITORY_DIR", "here")  # the environment: as typed
    assert Settings(config_file=config).repository_dir == Path("here")
