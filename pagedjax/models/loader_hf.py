"""Read a Hugging Face model folder: config.json + safetensors (single file or sharded with an index)."""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors import safe_open


def is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def read_hf_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def _safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, n) for n in names]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    return [os.path.join(folder, f) for f in files]


def read_hf_tensors(folder: str) -> dict[str, np.ndarray]:
    """All tensors of the checkpoint as float32 numpy arrays under their HF names."""
    tensors: dict[str, np.ndarray] = {}
    for path in _safetensors_files(folder):
        # The flax framework reads bfloat16 too (numpy has no bfloat16 of its own).
        with safe_open(path, framework="flax") as f:
            for name in f.keys():
                tensors[name] = np.asarray(f.get_tensor(name), dtype=np.float32)
    return tensors
