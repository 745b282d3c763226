"""The Flax `nnx` model definitions: the state a loader builds is exactly the module's state, every
parameter carries logical axis names (for the sharding rules), and binding a wrong state fails
clearly instead of running with missing or stray weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from pagedjax.config import ModelConfig
from pagedjax.models.functional import bind
from pagedjax.models.loader_hf import read_hf_config, read_hf_tensors
from pagedjax.models.registry import build_params, get_model_class


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "tied"])
def loaded(request, model_dir):
    path = model_dir(request.param)
    config = ModelConfig.from_hf_config(read_hf_config(path))
    return config, build_params(read_hf_tensors(path), config, "float32")


def _structure(tree) -> list[tuple[str, tuple]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return sorted((jax.tree_util.keystr(p), tuple(x.shape)) for p, x in flat)


def test_loaded_state_is_the_module_state(loaded):
    config, params = loaded
    cls = get_model_class(config)
    abstract = nnx.eval_shape(lambda: cls(config, jnp.float32))
    expected = nnx.to_pure_dict(nnx.state(abstract))
    assert _structure(params) == _structure(expected)


def test_every_param_has_logical_axes(loaded):
    config, _ = loaded
    abstract = nnx.eval_shape(lambda: get_model_class(config)(config, jnp.float32))
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == len(var.get_value().shape), path


def test_bind_rejects_missing_and_stray_weights(loaded):
    config, params = loaded
    cls = get_model_class(config)
    model = bind(cls, config, params)
    assert isinstance(model, cls)
    missing = {**params, "final_norm": {}}
    with pytest.raises(KeyError, match="final_norm"):
        bind(cls, config, missing)
    stray = {**params, "layers": {**params["layers"], "extra": {"kernel": jnp.zeros(3)}}}
    with pytest.raises(ValueError, match="extra"):
        bind(cls, config, stray)
