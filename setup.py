"""Builds dgsct_kernels._C by driving CMakeLists.txt (the only build description).

Environment:
  DGSCT_SKIP_CUDA=1    never build the CUDA part
  DGSCT_CPU_NATIVE=0   portable CPU kernels (default: tuned with -march=native)
  DGSCT_FORCE_CUDA=1   build it even where no CUDA build of torch is detected
  DGSCT_CUDA_ARCHS     e.g. "8.0;9.0a" or "80 90a" (default: 80;90)
  MAX_JOBS             parallel compile jobs
  DGSCT_BUILD_DIR      CMake build folder (default: build/cmake-<python>-<torch>, kept
                       between installs so a reinstall recompiles only what changed)
Build against the torch that will run it: install torch first, then
`pip install --no-build-isolation -e .`.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cuda_decision(torch) -> tuple[bool, str]:
    """(build the CUDA part?, reason when not)."""
    if _flag("DGSCT_SKIP_CUDA"):
        return False, "DGSCT_SKIP_CUDA=1"
    from torch.utils.cpp_extension import CUDA_HOME
    nvcc = shutil.which("nvcc") or (CUDA_HOME and shutil.which("nvcc", path=str(Path(CUDA_HOME) / "bin")))
    if _flag("DGSCT_FORCE_CUDA"):
        return (True, "") if nvcc else (False, "DGSCT_FORCE_CUDA=1 but nvcc was not found")
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if not nvcc:
        return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return True, ""


def cuda_extra_includes() -> list[str]:
    """Header folders of the CUDA libraries torch's wheels ship (nvidia/<pkg>/include):
    torch's CUDA headers include cusparse.h and cublas_v2.h, which a bare nvcc lacks."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels torch depends on
    except ImportError:
        return []
    found = []
    for root in getattr(nvidia, "__path__", []):
        found += sorted(str(p) for p in Path(root).glob("*/include") if p.is_dir())
    return found


def cuda_archs() -> str:
    raw = os.environ.get("DGSCT_CUDA_ARCHS", "80;90")
    archs = [a.replace(".", "") for a in re.split(r"[;,\s]+", raw.strip()) if a]
    for arch in archs:
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise SystemExit(f"DGSCT_CUDA_ARCHS={raw!r}: cannot read {arch!r}; expected e.g. '8.0;9.0a'")
    return ";".join(archs)


def persistent_build_dir(torch) -> Path:
    """A build folder that outlives pip's temporary one, so reinstalling (the README's
    commands run `pip install -e .` every time) rebuilds only what changed. Keyed by the
    Python and torch it builds against; DGSCT_BUILD_DIR overrides it."""
    if os.environ.get("DGSCT_BUILD_DIR"):
        return Path(os.environ["DGSCT_BUILD_DIR"]).resolve()
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return ROOT / "build" / f"cmake-{python}-torch{torch.__version__.replace('+', '-')}"


def requirement_sections(path: Path = ROOT / "requirements.txt") -> dict[str, list[str]]:
    """requirements.txt's `# [section]` blocks: the one place every dependency is named."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        header = re.match(r"#\s*\[(\w+)\]", line)
        if header:
            current = sections.setdefault(header.group(1), [])
        elif line and not line.startswith("#"):
            if current is None:
                raise SystemExit(f"{path}: {line!r} comes before any '# [section]' header")
            current.append(line)
    return sections


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            import torch
        except ImportError:
            raise SystemExit("dgsct-kernels builds against the torch that will run it: install "
                             "torch first (pip install -r requirements.txt), then "
                             "pip install --no-build-isolation -e .") from None
        from torch.utils import cpp_extension

        with_cuda, reason = cuda_decision(torch)
        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = persistent_build_dir(torch)
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DDGSCT_PYTHON_INCLUDE={sysconfig.get_paths()['include']}",
            f"-DDGSCT_TORCH_INCLUDE_DIRS={';'.join(cpp_extension.include_paths())}",
            f"-DDGSCT_TORCH_LIBRARY_DIRS={';'.join(cpp_extension.library_paths())}",
            f"-DDGSCT_TORCH_VERSION={torch.__version__}",
            f"-DDGSCT_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DDGSCT_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            f"-DDGSCT_OUTPUT_DIR={output_dir}",
            f"-DDGSCT_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DDGSCT_CUDA_ARCHS={cuda_archs()}",
            f"-DDGSCT_CUDA_REASON={reason}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DDGSCT_CPU_NATIVE={'OFF' if os.environ.get('DGSCT_CPU_NATIVE', '1').strip().lower() in ('0', 'false', 'no', 'off') else 'ON'}",
        ]
        if with_cuda:
            nvcc = shutil.which("nvcc") or str(Path(cpp_extension.CUDA_HOME or "") / "bin" / "nvcc")
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     f"-DDGSCT_CUDA_EXTRA_INCLUDES={';'.join(cuda_extra_includes())}"]
        if shutil.which("ninja"):
            args.append("-GNinja")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args])
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])


if __name__ == "__main__":  # pip runs setup.py as __main__; tests import the helpers above
    requirements = requirement_sections()
    extras = {name: reqs for name, reqs in requirements.items() if name not in ("core", "build")}
    extras["all"] = sorted({r for reqs in extras.values() for r in reqs})
    setup(
        name="dgsct-kernels",
        version="0.1.0",
        description="Fused DG-SCT (cross-modal prompts) kernels for PyTorch",
        packages=find_packages(include=["dgsct_kernels", "dgsct_kernels.*"]),
        python_requires=">=3.10",
        install_requires=requirements["core"],
        extras_require=extras,
        package_data={"dgsct_kernels": ["measured_winners.json", "compile_status.json", "param_slots.def",
                                       "precision_plan.def"]},
        ext_modules=[CMakeExtension("dgsct_kernels._C")],
        cmdclass={"build_ext": CMakeBuild},
        zip_safe=False,
    )
