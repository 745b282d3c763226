"""pagedjax.platform (CPU feature parsing, what "auto" resolves to, describe()) and the env tables
(pagedjax.envs, pallas_kernels.cpu.envs): every PAGEDJAX_* name in the source tree is documented."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from pagedjax import envs, platform
from pallas_kernels import cpu as cpu_kernels
from pallas_kernels.cpu import envs as kernel_envs

ROOT = Path(__file__).resolve().parents[1]

SAPPHIRE_RAPIDS = """\
processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512dq avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
bogomips\t: 5399.99

processor\t: 1
vendor_id\t: SomethingElse
model name\t: not the first processor
flags\t\t: fpu
"""
ZEN4 = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni
"""
ARM = """\
processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16 sve
CPU implementer\t: 0x41
"""


def test_parse_cpuinfo_intel_amx():
    f = platform.parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert f.vendor == "GenuineIntel"
    assert f.model_name == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert (f.avx512f, f.avx512_bf16, f.avx512_vnni) == (True, True, True)
    assert (f.amx_bf16, f.amx_int8, f.amx_tile) == (True, True, True)
    assert f.has("avx2") and not f.has("fpu vme")
    assert "flags" not in f.as_dict() and f.as_dict()["amx_tile"] is True


def test_parse_cpuinfo_zen4_arm_empty():
    z = platform.parse_cpuinfo(ZEN4)
    assert (z.vendor, z.avx512_bf16, z.avx512_vnni, z.amx_tile, z.amx_bf16) == (
        "AuthenticAMD",
        True,
        True,
        False,
        False,
    )
    a = platform.parse_cpuinfo(ARM)
    assert a.vendor == "" and a.has("asimd") and not a.avx512f
    assert platform.parse_cpuinfo("") == platform.CpuFeatures()


def test_cpu_features_reads_cpuinfo_once(tmp_path, monkeypatch):
    fake = tmp_path / "cpuinfo"
    fake.write_text(ZEN4)
    monkeypatch.setattr(platform, "CPUINFO", str(fake))
    platform.cpu_features.cache_clear()
    try:
        assert platform.cpu_features().vendor == "AuthenticAMD"
        fake.write_text(SAPPHIRE_RAPIDS)
        assert platform.cpu_features().vendor == "AuthenticAMD"  # cached
        assert platform._cpu_vendor() == "AuthenticAMD"
        monkeypatch.setattr(platform, "CPUINFO", str(tmp_path / "missing"))
        platform.cpu_features.cache_clear()
        assert platform.cpu_features() == platform.CpuFeatures()
    finally:
        platform.cpu_features.cache_clear()


@pytest.mark.parametrize(
    ("backend", "kernel", "vendor", "expected"),
    [
        ("gpu", None, "", "bfloat16"),
        ("tpu", None, "", "bfloat16"),
        ("cpu", "amx", "GenuineIntel", "bfloat16"),
        ("cpu", "avx512_bf16", "AuthenticAMD", "bfloat16"),
        ("cpu", "avx512_bf16", "GenuineIntel", "float32"),  # VDPBF16PS slower than f32 FMA there
        ("cpu", None, "AuthenticAMD", "float32"),
    ],
)
def test_default_dtype(monkeypatch, backend, kernel, vendor, expected):
    from pallas_kernels.cpu import amx_matmul

    monkeypatch.setattr(platform, "backend", lambda: backend)
    monkeypatch.setattr(amx_matmul, "kernel_name", lambda: kernel)
    monkeypatch.setattr(platform, "_cpu_vendor", lambda: vendor)
    assert platform.default_dtype() == expected


def test_auto_backends_match_the_engine():
    """What platform says "auto" is, is what the model runner resolves."""
    import jax.numpy as jnp

    import pallas_kernels
    from pagedjax.models.layers.linear import resolve_matmul_backend

    assert platform.default_attention_backend() == pallas_kernels.resolve_backend("auto")
    for shape in ({"head_dim": 64, "page_size": 16}, {"head_dim": 80, "page_size": 16}):
        for plat in ("cpu", "gpu", "tpu"):
            assert platform.default_attention_backend(plat, **shape) == pallas_kernels.resolve_backend(
                "auto", plat, **shape
            )
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        params = {"layers": {"qkv_proj": {"kernel": jnp.zeros((2, 2), dtype)}}}
        for plat in (None, "cpu", "gpu"):
            assert platform.default_matmul_backend(dtype, plat) == resolve_matmul_backend(
                "auto", params, plat
            )


def test_describe():
    d = platform.describe()
    assert {
        "backend",
        "device_kind",
        "device_count",
        "jax_version",
        "cpu",
        "default_dtype",
        "default_attention_backend",
        "default_matmul_backend",
        "cpu_kernels",
        "env",
    } <= set(d)
    json.dumps(d)  # JSON-able
    assert d["backend"] in ("cpu", "gpu", "tpu")
    assert d["default_dtype"] == platform.default_dtype()
    assert set(d["cpu"]) == {"vendor", "model_name", *platform._FLAG_FIELDS}
    assert set(d["cpu_kernels"]) == set(platform.CPU_KERNELS)
    for name, k in d["cpu_kernels"].items():
        assert isinstance(k["available"], bool), name
        assert (k["unavailable_reason"] is None) == k["available"], (name, k)


def test_every_kernel_module_uses_the_load_once_helper():
    import importlib

    for module in platform.CPU_KERNELS.values():
        kernel = importlib.import_module(module)
        assert isinstance(kernel._kernel, cpu_kernels.KernelLibrary), module
        assert kernel._ensure_loaded == kernel._kernel.ensure_loaded, module
        assert callable(kernel.is_available) and callable(kernel.unavailable_reason), module
        assert kernel._kernel.env_switch in {v.name for v in kernel_envs.VARIABLES}


def _fake_kernel(monkeypatch, switch: str, value: str | None):
    calls = []
    g = {"_state": {}, "_lock": threading.Lock()}
    lib = cpu_kernels.KernelLibrary(g, "fake kernel", switch, lambda: calls.append(1) or "lib")
    if value is None:
        monkeypatch.delenv(switch, raising=False)
    else:
        monkeypatch.setenv(switch, value)
    return lib, g, calls


@pytest.mark.parametrize("value", ["0", "false", "off", "OFF"])
def test_kernel_switch_off(monkeypatch, value):
    lib, g, calls = _fake_kernel(monkeypatch, "PAGEDJAX_CPU_TOPK", value)
    assert not lib.is_available() and not lib.is_available()
    assert lib.unavailable_reason() == "fake kernel unavailable: disabled by PAGEDJAX_CPU_TOPK=0"
    assert calls == []
    g["_state"] = {}  # a swapped module _state is what counts (tests do this)
    monkeypatch.setenv("PAGEDJAX_CPU_TOPK", "1")
    assert lib.is_available() and lib.ensure_loaded() == "lib" and calls == [1]
    assert lib.unavailable_reason() is None


@pytest.mark.parametrize("value", [None, "1", "on", ""])
def test_kernel_switch_on(monkeypatch, value):
    lib, _, calls = _fake_kernel(monkeypatch, "PAGEDJAX_CPU_SAMPLER", value)
    assert lib.is_available() and lib.is_available() and calls == [1]


def test_kernel_library_needs_a_documented_switch():
    with pytest.raises(KeyError):
        cpu_kernels.KernelLibrary({}, "x", "PAGEDJAX_NOT_DOCUMENTED", lambda: None)


def test_env_accessors(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGEDJAX_KERNEL_CACHE", str(tmp_path))
    assert kernel_envs.kernel_cache_dir() == tmp_path
    monkeypatch.delenv("PAGEDJAX_KERNEL_CACHE")
    assert kernel_envs.kernel_cache_dir() == Path.home() / ".cache" / "pagedjax" / "kernels"
    monkeypatch.setenv("PAGEDJAX_CPU_BF16_MATMUL", "avx512")
    assert kernel_envs.bf16_matmul_forces_avx512()
    monkeypatch.setenv("PAGEDJAX_CPU_BF16_MATMUL", "auto")
    assert not kernel_envs.bf16_matmul_forces_avx512()
    monkeypatch.setenv("PAGEDJAX_CPU_ATTN_THREADS", "3")
    assert kernel_envs.cpu_attn_threads() == 3
    for off in ("off", "0", "None", ""):
        monkeypatch.setenv("PAGEDJAX_COMPILATION_CACHE", off)
        assert envs.compilation_cache_dir() is None
    assert envs.compilation_cache_dir("/x") == "/x"
    monkeypatch.setenv("PAGEDJAX_COMPILATION_CACHE", str(tmp_path))
    assert envs.compilation_cache_dir() == str(tmp_path)
    assert envs.compilation_cache_dir("off") is None
    monkeypatch.delenv("PAGEDJAX_COMPILATION_CACHE")
    assert envs.compilation_cache_dir().endswith("/.cache/pagedjax/xla")
    monkeypatch.setenv("PAGEDJAX_MALLOC_TUNING", "0")
    assert not envs.malloc_tuning()
    monkeypatch.setenv("PAGEDJAX_MALLOC_TUNING", "off")  # only "0" turns it off (as before)
    assert envs.malloc_tuning()


NAME = re.compile(r"PAGEDJAX_[A-Z0-9_]*[A-Z0-9]")
ENV_MODULES = {ROOT / "pagedjax" / "envs.py", ROOT / "pallas_kernels" / "cpu" / "envs.py"}


def _sources():
    for package in ("pagedjax", "pallas_kernels"):
        for path in sorted((ROOT / package).rglob("*")):
            if path.suffix in (".py", ".cc", ".h") and path.is_file():
                yield path


def test_env_table_documents_every_variable():
    """Every PAGEDJAX_* name in pagedjax/ or pallas_kernels/ (Python, C++) is in envs.table()."""
    rows = envs.table()
    names = [name for name, _, _ in rows]
    assert len(names) == len(set(names)), "a variable is listed twice"
    assert all(default and help_ for _, default, help_ in rows)
    found: dict[str, str] = {}
    for path in _sources():
        for name in NAME.findall(path.read_text(errors="replace")):
            found.setdefault(name, str(path.relative_to(ROOT)))
    missing = {name: where for name, where in found.items() if name not in names}
    assert not missing, (
        f"undocumented: add these to pagedjax/envs.py or pallas_kernels/cpu/envs.py: {missing}"
    )
    assert {v.name for v in envs.kernel_variables()} <= set(names)
    assert "| `PAGEDJAX_CPU_KERNEL` |" in envs.markdown_table()


def test_python_reads_env_vars_through_envs():
    """Outside the two envs modules, Python code reads no PAGEDJAX_* variable itself."""
    direct = re.compile(r"""(environ\s*(\.get\s*\(|\[)|getenv\s*\()\s*["']PAGEDJAX_""")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in _sources()
        if path.suffix == ".py" and path not in ENV_MODULES
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if direct.search(line)
    ]
    assert not offenders, offenders
