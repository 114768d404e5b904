"""The compiled extension, its build switches, and `python -m dgsct_kernels.info`."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=300)


def test_info_prints_versions_backends_and_one_line_per_extension():
    result = subprocess.run([sys.executable, "-m", "dgsct_kernels.info"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^torch \d", out, re.M) and re.search(r"^triton ", out, re.M)
    assert re.search(r"^cuda \(torch build\) ", out, re.M)
    cpu = re.findall(r"^cpu extension: (built|not built \(.+\))$", out, re.M)
    cuda = re.findall(r"^cuda extension: (built \(archs .+\)|not built \(.+\))$", out, re.M)
    assert len(cpu) == 1 and len(cuda) == 1, out
    assert re.search(r"^  reference +usable on cpu/float64", out, re.M), out
    if cpu == ["built"]:  # the fused C++ backend comes with the extension
        assert re.search(r"^  cpu +usable on cpu/float64, cpu/float32, cpu/bfloat16", out, re.M), out


@pytest.mark.skipif(os.environ.get("DGSCT_REQUIRE_EXTENSION") != "1",
                    reason="set DGSCT_REQUIRE_EXTENSION=1 where the extension must have been built (CI)")
def test_extension_was_built():
    from dgsct_kernels import extension_status
    status = extension_status()
    assert status["cpu"][0], status
    assert status["info"]["torch_version"].split("+")[0] in __import__("torch").__version__


def test_package_works_without_the_extension_with_one_warning():
    code = ("import sys, warnings\n"
            "sys.modules['dgsct_kernels._C'] = None  # as if it failed to import\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    import dgsct_kernels, torch\n"
            "    import dgsct_kernels.info\n"
            "ours = [w for w in caught if 'dgsct_kernels._C' in str(w.message)]\n"
            "assert len(ours) == 1, [str(w.message) for w in caught]\n"
            "m = dgsct_kernels.FusedDGSCT(16, 8, 6, 5, segments=2)\n"
            "out = m(torch.randn(4, 6, 16), torch.randn(4, 5, 8))\n"
            "print(dgsct_kernels.info.report())\n")
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert "cpu extension: not built (import failed" in result.stdout


def _load_setup_module():
    spec = importlib.util.spec_from_file_location("dgsct_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_switches(monkeypatch):
    import torch
    setup = _load_setup_module()
    monkeypatch.setenv("DGSCT_SKIP_CUDA", "1")
    monkeypatch.setenv("DGSCT_FORCE_CUDA", "1")
    assert setup.cuda_decision(torch) == (False, "DGSCT_SKIP_CUDA=1")
    monkeypatch.delenv("DGSCT_SKIP_CUDA")
    built, reason = setup.cuda_decision(torch)
    assert built == bool(shutil.which("nvcc")), reason
    monkeypatch.delenv("DGSCT_FORCE_CUDA")
    built, reason = setup.cuda_decision(torch)
    if torch.version.cuda is None:
        assert not built and "not a CUDA build" in reason
    monkeypatch.setenv("DGSCT_CUDA_ARCHS", "8.0;9.0a")
    assert setup.cuda_archs() == "80;90a"
    monkeypatch.setenv("DGSCT_CUDA_ARCHS", "80 90a 100f")
    assert setup.cuda_archs() == "80;90a;100f"
    monkeypatch.setenv("DGSCT_CUDA_ARCHS", "hopper")
    with pytest.raises(SystemExit, match="DGSCT_CUDA_ARCHS"):
        setup.cuda_archs()


def test_every_requirement_is_named_once():
    """requirements.txt is the one list: setup.py's install_requires and extras come from
    its sections, and torch's requirement appears nowhere else."""
    setup = _load_setup_module()
    sections = setup.requirement_sections()
    assert {"core", "models", "bench", "test", "build"} <= set(sections)
    names = [re.split(r"[<>=!~\[; ]", r)[0].lower() for reqs in sections.values() for r in reqs]
    assert len(names) == len(set(names)), f"named twice in requirements.txt: {names}"
    assert sum(r.startswith("torch") for r in sections["core"]) == 1
    for other in ("setup.py", "pyproject.toml", ".ci/run"):
        text = (ROOT / other).read_text()
        assert not re.search(r"""["']torch[<>=~!]""", text), f"{other} names a torch version"
    assert "timm>=1.0" in sections["models"] and "hypothesis" in sections["test"]
