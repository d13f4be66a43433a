"""The model a config describes, on the meta device: the names and shapes of the real build, no storage."""

from __future__ import annotations

import pytest

from moetune.models.load.factory import build_base_model, resolve_family
from moetune.models.load.meta import build_on_meta, local_model_config


def test_the_meta_model_has_the_real_models_names_and_shapes_and_no_storage(mixtral_config, tmp_path):
    config = mixtral_config()
    meta = build_on_meta(local_model_config(config.model, resolve_family(config.model)))
    real = build_base_model(config, seed=0)
    assert all(p.is_meta for p in meta.parameters())
    assert {n: tuple(p.shape) for n, p in meta.named_parameters()} == {n: tuple(p.shape) for n, p in real.named_parameters()}

    real.save_pretrained(tmp_path / "saved")  # a local folder with a config.json, as a hub download leaves
    from_folder = mixtral_config(f"model.name={tmp_path / 'saved'}", "model.random_init=false")
    again = build_on_meta(local_model_config(from_folder.model, resolve_family(from_folder.model)))
    assert [n for n, _ in again.named_parameters()] == [n for n, _ in meta.named_parameters()]


def test_a_model_only_on_a_hub_has_no_local_config(mixtral_config):
    config = mixtral_config("model.random_init=false", "model.name=someone/not-downloaded")
    assert local_model_config(config.model, resolve_family(config.model)) is None


@pytest.mark.parametrize("broken", ["{", '{"model_type": "no_such_type"}'])
def test_an_unreadable_config_json_is_a_user_error(mixtral_config, tmp_path, broken):
    from moetune.errors import UserError

    (tmp_path / "config.json").write_text(broken)
    config = mixtral_config(f"model.name={tmp_path}", "model.random_init=false")
    with pytest.raises(UserError, match="config.json could not be read"):
        local_model_config(config.model, resolve_family(config.model))
