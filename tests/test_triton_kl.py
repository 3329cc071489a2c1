"""opd/kernels/triton_kl.py against its torch reference, on CPU under the Triton interpreter.

TRITON_INTERPRET=1 must be in the environment before the kernel is decorated (`triton.jit` decides at import
whether to interpret), and this pytest process may already have imported kernels.triton_kl compiled for GPU
(tests/gpu/ is collected first). So the kernel cases run in ONE subprocess, this file run as a script with the
variable set; it writes one result per case to a JSON file, and each case is reported here as its own test.
Input validation and the reference itself need no kernel launch and run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# Small odd shapes: V is not a multiple of the tile, several tiles run, padded columns >= VALID_VOCAB.
C, V, VALID_VOCAB, BLOCK_V = 5, 1031, 1000, 256
KINDS = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.0), ("jsd", 1.0)]
TOL = {"float32": 1e-5, "bfloat16": 2e-2}

CASES = {
    **{f"{kind}-{beta}-{dtype}": dict(kind=kind, beta=beta, dtype=dtype)
       for dtype in TOL for kind, beta in KINDS},
    # Logits around +200 (student) and -150 (teacher): z - logsumexp(z) alone would drift ~1e-4 here.
    **{f"large_logits-{kind}-{beta}": dict(kind=kind, beta=beta, dtype="float32", offset_s=200.0,
                                           offset_t=-150.0, temperature=1.0)
       for kind, beta in [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5)]},
    # Automatic tile (one 1024 tile covers the valid columns, pass 3 still needs two) and valid_vocab == V.
    "auto_block-jsd-0.5": dict(kind="jsd", beta=0.5, dtype="float32", block_v=None),
    "full_vocab-rkl": dict(kind="rkl", beta=0.5, dtype="float32", valid_vocab=V),
    "no_grad-jsd-0.5": dict(kind="jsd", beta=0.5, dtype="bfloat16", compute_grad=False),
}
# opd/kernels/chunked.py driving the Triton rows (what runs on CUDA) against the materialised reference.
CHUNKED_CASES = {f"chunked_triton-{kind}-{beta}": dict(kind=kind, beta=beta) for kind, beta in KINDS[:4]}


def _inputs(dtype: str, offset_s: float = 0.0, offset_t: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(C, V, generator=g) * 3 + offset_s).to(getattr(torch, dtype))
    teacher = (torch.randn(C, V, generator=g) * 3 + offset_t).to(getattr(torch, dtype))
    weights = torch.tensor([1.0, 0.0, 2.5, 0.3, 0.0])  # zero weights: those rows get exactly zero gradient
    return student, teacher, weights


def _report(name: str, got: torch.Tensor, want: torch.Tensor, tol: float, atol: float = 0.0) -> None:
    """Fail naming how many elements differ and where (relative tolerance plus an absolute floor)."""
    diff = (got.float() - want.float()).abs()
    bad = diff > tol * want.float().abs() + atol
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} elements differ, max {diff.max():.3e} "
                           f"at {tuple(int(i) for i in torch.nonzero(bad)[0])}")


def _run_case(kind: str, beta: float, dtype: str, offset_s: float = 0.0, offset_t: float = 0.0,
              temperature: float = 1.7, valid_vocab: int = VALID_VOCAB, block_v: int | None = BLOCK_V,
              compute_grad: bool = True) -> None:
    from opd.kernels.triton_kl import ref_row_divergence, row_divergence_

    student, teacher, weights = _inputs(dtype, offset_s, offset_t)
    kw = dict(kind=kind, beta=beta, temperature=temperature, valid_vocab=valid_vocab, grad_scale=0.37)
    want_rows, want_stats, want_grad = ref_row_divergence(student, teacher, weights, **kw)
    buf = student.clone()
    rows, stats = row_divergence_(buf, teacher, weights, compute_grad=compute_grad, block_v=block_v, **kw)
    assert rows.dtype == stats.dtype == torch.float32 and rows.shape == (C,) and stats.shape == (C, 3)
    # Rows and stats are fp32 sums of the same (upcast) inputs whatever the input dtype: compare them tightly
    # (absolute floor for near-zero divergences); the dtype tolerance applies to the bf16-stored gradient.
    _report("rows", rows, want_rows, 1e-5, atol=1e-5)
    _report("stats", stats, want_stats, 1e-5, atol=1e-5)
    if not compute_grad:
        assert torch.equal(buf, student), "compute_grad=False must leave student_CV untouched"
        return
    assert buf.dtype == student.dtype, "the gradient is written in the student's dtype"
    # Elementwise relative tolerance, with a floor tied to the gradient's scale for entries that cancel (p - q).
    tol = TOL[dtype]
    _report("grad", buf, want_grad, tol, atol=0.1 * tol * float(want_grad.abs().max()))
    assert not buf[:, valid_vocab:].any(), "padded columns must get exactly zero gradient"
    assert not buf[weights == 0].any(), "zero-weight rows must get exactly zero gradient"


def _run_chunked_case(kind: str, beta: float) -> None:
    from opd.kernels.chunked import chunked_divergence
    from opd.kernels.reference import distill_loss

    g = torch.Generator().manual_seed(1)
    h_s, w_s = torch.randn(13, 24, generator=g).requires_grad_(), torch.randn(V, 24, generator=g).requires_grad_()
    h_t, w_t = torch.randn(13, 40, generator=g), torch.randn(V + 8, 40, generator=g)
    weights = (torch.rand(13, generator=g) > 0.2).float()
    kw = dict(kind=kind, beta=beta, temperature=1.7, num_tokens=17, valid_vocab=VALID_VOCAB)
    want = distill_loss(h_s, w_s, h_t, w_t, weights, **kw)
    want_grads = torch.autograd.grad(want, [h_s, w_s])
    got, _ = chunked_divergence(h_s, w_s, h_t, w_t, weights, chunk_size=5, backend="triton", **kw)
    got_grads = torch.autograd.grad(got, [h_s, w_s])
    _report("loss", got.detach(), want.detach(), 1e-5, atol=1e-6)
    for name, a, b in zip(("grad h_s", "grad w_s"), got_grads, want_grads, strict=True):
        _report(name, a, b, 1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.fixture(scope="module")
def interpreted_results(tmp_path_factory) -> dict:
    pytest.importorskip("triton", reason="triton is not installed (pip install triton; CPU is fine)")
    out = tmp_path_factory.mktemp("triton_kl") / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and out.exists(), f"interpreter worker failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", list(CASES) + list(CHUNKED_CASES))
def test_kernel_matches_reference_interpreted(interpreted_results, case):
    result = interpreted_results[case]
    assert result["ok"], result["error"]


def test_input_validation():
    from opd.kernels.triton_kl import ref_row_divergence, row_divergence_

    student, teacher, weights = _inputs("float32")
    kw = dict(beta=0.5, temperature=1.0, valid_vocab=VALID_VOCAB, grad_scale=1.0)
    for fn in (row_divergence_, ref_row_divergence):
        with pytest.raises(ValueError, match="unknown loss kind"):
            fn(student, teacher, weights, kind="kl", **kw)
        with pytest.raises(ValueError, match=r"\[C, V\]"):
            fn(student, teacher[:, :-1], weights, kind="fkl", **kw)
        with pytest.raises(ValueError, match=r"weights_C must be \[C\]"):
            fn(student, teacher, weights[:-1], kind="fkl", **kw)
        with pytest.raises(ValueError, match="contiguous"):
            fn(student.T.contiguous().T, teacher, weights, kind="fkl", **kw)
        with pytest.raises(ValueError, match="valid_vocab"):
            fn(student, teacher, weights, kind="fkl", **{**kw, "valid_vocab": V + 1})
        with pytest.raises(ValueError, match="beta"):
            fn(student, teacher, weights, kind="jsd", **{**kw, "beta": 1.5})
        with pytest.raises(ValueError, match="temperature"):
            fn(student, teacher, weights, kind="rkl", **{**kw, "temperature": 0.0})


def test_reference_matches_closed_form_gradients():
    """Guards the oracle: its autograd gradient equals the closed forms of opd/kernels/chunked.py's docstring."""
    import math

    from opd.kernels.reference import masked_log_softmax
    from opd.kernels.triton_kl import ref_row_divergence

    student, teacher, weights = _inputs("float32")
    for kind, beta in KINDS:
        _, stats, grad = ref_row_divergence(student, teacher, weights, kind=kind, beta=beta, temperature=1.7,
                                            valid_vocab=VALID_VOCAB, grad_scale=0.37)
        logp, logq = (masked_log_softmax(x, 1.7, VALID_VOCAB)[:, :VALID_VOCAB] for x in (student, teacher))
        p, q = logp.exp(), logq.exp()
        _report(f"{kind}({beta}) entropy", stats[:, 2], -(p * logp).sum(-1), 1e-5, atol=1e-6)
        if kind == "fkl" or beta == 0.0:
            d_ds = p - q
        elif kind == "rkl" or beta == 1.0:
            d_ds = p * (logp - logq - stats[:, 1:2])
        else:
            logm = torch.logaddexp(logq + math.log(beta), logp + math.log1p(-beta))
            d_ds = (1 - beta) * p * (logp - logm - (p * (logp - logm)).sum(-1, keepdim=True))
        want = d_ds * (weights * 0.37 / 1.7)[:, None]
        _report(f"{kind}({beta}) grad", grad[:, :VALID_VOCAB], want, 1e-4, atol=1e-8)
        assert not grad[:, VALID_VOCAB:].any()


def _worker(out_path: str) -> None:
    """Subprocess entry point: run every kernel case under the interpreter, record pass/fail per case."""
    assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules
    results = {}
    for name, (run, case) in {**{k: (_run_case, c) for k, c in CASES.items()},
                              **{k: (_run_chunked_case, c) for k, c in CHUNKED_CASES.items()}}.items():
        start = time.perf_counter()
        try:
            run(**case)
            results[name] = {"ok": True, "error": "", "seconds": time.perf_counter() - start}
        except Exception:  # noqa: BLE001 - report every case's failure to the parent, not just the first
            results[name] = {"ok": False, "error": traceback.format_exc(), "seconds": time.perf_counter() - start}
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    _worker(sys.argv[1])
