"""The hf engine samples from the model's distribution (both transformers' `generate` and the engine's own
decode loop): temperature, top-k and top-p each checked by a chi-square test of token frequencies
(tests/sampling_check.py says why the sample size and bound). The CUDA samplers' twin is tests/gpu/. Which sampler
rollout.sampler picks: FlashInfer only where it imports and has its kernels (simulated: a fake flashinfer, nvcc or
not, flashinfer-jit-cache or not)."""

import importlib
import sys
import warnings

import pytest
import torch
from transformers import AutoTokenizer

from opd import preflight
from opd.actors.engines.hf import HFEngine, resolve_sampler
from opd.config import ConfigError
from opd.overrides import override
from opd.presets import tiny_cpu
from opd.samplers import flashinfer_kernels
from sampling_check import CASES, P_MIN, PREFIX, check_first_token_distribution, chi_square_p


@pytest.fixture(scope="module")
def engine_and_ids(root):
    tok = AutoTokenizer.from_pretrained(root / "assets/toy/student")
    engine = HFEngine.from_pretrained(str(root / "assets/toy/student"), eos_id=tok.eos_token_id,
                                      pad_id=tok.pad_token_id)
    return engine, tok(PREFIX).input_ids


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sampler", [None, "torch"], ids=["generate", "decode_loop"])
def test_token_frequencies_follow_the_model(engine_and_ids, sampler, case):
    engine, ids = engine_and_ids
    engine.sampler = sampler  # None: transformers' generate; "torch": the engine's decode loop
    check_first_token_distribution(engine, engine.model, ids, case)


def test_the_chi_square_check_against_known_values():
    """The statistic and p-value against values worked by hand / from tables."""
    # 3 bins, expected 50 each, observed 60/40/50: X^2 = (100 + 100) / 50 = 4, dof 2 -> p = exp(-2)
    p, statistic = chi_square_p(torch.tensor([60, 40, 50]), torch.tensor([1 / 3] * 3, dtype=torch.float64))
    assert statistic == pytest.approx(4.0) and p == pytest.approx(0.1353352832, rel=1e-9)
    # 1 dof: X^2 = 3.841459 is the 5 % critical value
    p, _ = chi_square_p(torch.tensor([5000 + 98, 5000 - 98]), torch.tensor([0.5, 0.5]))
    assert p == pytest.approx(0.05, rel=0.01)
    # a token the truncation removed was drawn: rejected outright
    assert chi_square_p(torch.tensor([10, 1]), torch.tensor([1.0, 0.0]))[0] == 0.0
    # an argmax sampler's counts against a spread distribution
    assert chi_square_p(torch.tensor([1000, 0, 0]), torch.tensor([0.5, 0.3, 0.2]))[0] < P_MIN


@pytest.fixture
def gpu_machine(tmp_path, monkeypatch):
    """A fake machine for FlashInfer: `add(name)` makes package `name` importable; no CUDA toolkit unless a test
    gives one (CUDA_HOME, which FlashInfer's JIT looks in first, points at an empty folder)."""
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-toolkit"))
    monkeypatch.delenv("CUDA_PATH", raising=False)

    def add(name: str) -> None:
        (tmp_path / "site" / name).mkdir(parents=True)
        (tmp_path / "site" / name / "__init__.py").write_text("")
        importlib.invalidate_caches()

    yield add
    for name in [m for m in sys.modules if m.split(".")[0] in ("flashinfer", "flashinfer_jit_cache")]:
        del sys.modules[name]  # the fakes must not outlive the test


def _nvcc(folder) -> str:
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (folder / "bin" / "nvcc").chmod(0o755)
    return str(folder)


def _resolved(name: str, device: str = "cuda") -> tuple[str | None, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sampler = resolve_sampler(name, torch.device(device))
    return sampler, [str(w.message) for w in caught]


def test_auto_picks_flashinfer_only_where_it_can_get_its_kernels(gpu_machine, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "flashinfer", None)  # not installed
        assert _resolved("auto") == ("torch", ["rollout.sampler=auto samples with torch, not FlashInfer: flashinfer is "
                                               "not installed: pip install -e '.[gpu]', or set rollout.sampler=torch"])
    gpu_machine("flashinfer")  # imports, but a driver-only machine: no nvcc, no precompiled kernels
    sampler, said = _resolved("auto")
    assert sampler == "torch" and said == [
        "rollout.sampler=auto samples with torch, not FlashInfer: flashinfer compiles its kernels at first use and "
        "finds no nvcc (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda) and no flashinfer-jit-cache: install the CUDA "
        "toolkit (nvcc) or flashinfer-jit-cache, or set rollout.sampler=torch"]
    assert _resolved("torch") == ("torch", []) and _resolved("generate") == (None, [])
    monkeypatch.setenv("CUDA_HOME", _nvcc(tmp_path / "cuda"))  # the toolkit where CUDA_HOME says
    assert _resolved("auto") == ("flashinfer", []) and _resolved("flashinfer") == ("flashinfer", [])
    monkeypatch.delenv("CUDA_HOME")  # ... or the nvcc on PATH
    monkeypatch.setenv("PATH", str(tmp_path / "cuda" / "bin"))
    assert _resolved("auto") == ("flashinfer", []) and flashinfer_kernels() == f"nvcc {tmp_path}/cuda/bin/nvcc"
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-toolkit"))
    gpu_machine("flashinfer_jit_cache")  # no nvcc, but the kernels precompiled
    assert _resolved("auto") == ("flashinfer", [])
    assert _resolved("auto", "cpu") == ("torch", [])  # FlashInfer samples on a GPU only: no warning on the CPU


def test_an_explicit_flashinfer_that_cannot_run_is_refused_before_work_starts(gpu_machine, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    gpu_machine("flashinfer")
    with pytest.raises(ValueError, match=r"^rollout.sampler=flashinfer cannot run here: flashinfer compiles its "
                                         r"kernels at first use and finds no nvcc .*: install the CUDA toolkit"):
        resolve_sampler("flashinfer", torch.device("cuda"))  # the engine, on the node it starts on
    with pytest.raises(ValueError, match="rollout.sampler=flashinfer samples on a GPU and this engine runs on cpu"):
        resolve_sampler("flashinfer", torch.device("cpu"))
    cfg = override(override(tiny_cpu(), "run.mode=colocated"), "rollout.sampler=flashinfer")
    with pytest.raises(ConfigError) as refused:  # preflight, before Ray starts
        preflight.check_sampler(cfg)
    assert str(refused.value).startswith("rollout.sampler=flashinfer cannot run here: flashinfer compiles its kernels")
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match="samples on a GPU, and run.mode=colocated with run.device=cpu runs"):
        preflight.check_sampler(override(cfg, "run.device=cpu"))
    preflight.check_sampler(override(cfg, "run.ray_address=ray://head:10001"))  # a cluster's nodes: the engine checks
    preflight.check_sampler(override(cfg, "rollout.sampler=auto"))  # auto falls back with a warning, never refuses
