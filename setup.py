"""Builds bitfuse, with its compiled part bitfuse._C made by CMake + Ninja (CMakeLists.txt).

Project metadata lives in pyproject.toml; this file adds the package layout (python/bitfuse as
`bitfuse`, the Triton kernels in python/bitfuse/kernels) and the CMake-driven build_ext.

Environment:
  BITFUSE_CUDA        auto (default): build the CUDA kernels if nvcc is found, looking at
                      $CUDACXX, then `nvcc` on PATH, then $CUDA_HOME/bin/nvcc (CUDA_HOME, else
                      CUDA_PATH, else /usr/local/cuda). 1: a missing nvcc is an error. 0: never.
  BITFUSE_CUDA_ARCHS  SM architectures, ';' or ',' separated (default 86;87;89;90: RTX 30 /
                      A-series, Jetson Orin, RTX 40 / L4, H100), or `native` (CMake >= 3.24).
  MAX_JOBS            parallel compile jobs (default: Ninja's choice).

Works with `pip install .`, `pip install -e .` (the module lands in python/bitfuse/) and
`pip install --no-build-isolation .`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
MIN_CMAKE = (3, 18)
MIN_PYBIND11 = (2, 10)
DEFAULT_ARCHS = "86;87;89;90"


def read_version() -> str:
    text = (ROOT / "python" / "bitfuse" / "version.py").read_text()
    m = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.M)
    if not m:
        raise SystemExit("bitfuse: cannot read __version__ from python/bitfuse/version.py")
    return m.group(1)


class BuildError(SystemExit):
    """A missing or unusable build tool; the message says what to install."""

    def __init__(self, msg: str):
        bar = "=" * 78
        super().__init__(f"\n{bar}\nbitfuse build error: {msg}\n{bar}\n")


def _version_of(cmd: list, pattern: str):
    """The (major, minor) a tool prints for `cmd`, or None if it does not run."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(pattern, out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _candidates(module: str, exe: str) -> list:
    """`exe` from the pip package `module` (cmake, ninja) if installed, then from PATH."""
    found = []
    try:
        mod = __import__(module)
        bin_dir = getattr(mod, "CMAKE_BIN_DIR", None) or getattr(mod, "BIN_DIR", None)
        if bin_dir and (Path(bin_dir) / exe).is_file():
            found.append(str(Path(bin_dir) / exe))
    except Exception:  # noqa: BLE001 - a broken pip package is the same as none
        pass
    on_path = shutil.which(exe)
    if on_path and on_path not in found:
        found.append(on_path)
    return found


def find_cmake() -> tuple:
    seen = []
    for exe in _candidates("cmake", "cmake"):
        ver = _version_of([exe, "--version"], r"cmake version (\d+)\.(\d+)")
        if ver and ver >= MIN_CMAKE:
            return exe, ver
        seen.append(f"{exe} ({'.'.join(map(str, ver)) if ver else 'does not run'})")
    need = ".".join(map(str, MIN_CMAKE))
    if seen:
        raise BuildError(f"CMake >= {need} is required, found only: {', '.join(seen)}. "
                         f"Install a newer one: pip install 'cmake>={need}'")
    raise BuildError(f"CMake >= {need} is required and was not found. "
                     f"Install it: pip install 'cmake>={need}' (or apt install cmake)")


def find_ninja() -> str:
    for exe in _candidates("ninja", "ninja"):
        if _version_of([exe, "--version"], r"(\d+)\.(\d+)"):
            return exe
    raise BuildError("Ninja was not found. Install it: pip install ninja (or apt install ninja-build)")


def check_cxx() -> None:
    cxx = os.environ.get("CXX")
    if cxx:
        exe = shlex.split(cxx)[0]
        if not shutil.which(exe):
            raise BuildError(f"the C++ compiler named by CXX={cxx!r} was not found")
        return
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise BuildError("no C++ compiler was found (looked for $CXX, c++, g++, clang++). "
                         "Install one with C++17 support, e.g. apt install g++ (build-essential)")


def find_pybind11() -> str:
    ver = _version_of([sys.executable, "-m", "pybind11", "--version"], r"(\d+)\.(\d+)")
    try:
        cmake_dir = subprocess.run([sys.executable, "-m", "pybind11", "--cmakedir"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        cmake_dir = ""
    need = ".".join(map(str, MIN_PYBIND11))
    if not cmake_dir or not ver:
        raise BuildError(f"pybind11 >= {need} is not installed for {sys.executable}. "
                         f"Install it: pip install 'pybind11>={need}' (with --no-build-isolation "
                         "the build uses the packages of the current environment)")
    if ver < MIN_PYBIND11:
        raise BuildError(f"pybind11 >= {need} is required, found {ver[0]}.{ver[1]}: "
                         f"pip install -U 'pybind11>={need}'")
    return cmake_dir


def find_nvcc() -> tuple:
    """(path or None, the places looked at)."""
    looked = []
    cudacxx = os.environ.get("CUDACXX")
    if cudacxx:
        looked.append(f"CUDACXX={cudacxx}")
        if Path(cudacxx).is_file():
            return cudacxx, looked
    else:
        looked.append("CUDACXX (unset)")
    looked.append("nvcc on PATH")
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path, looked
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cand = Path(home) / "bin" / "nvcc"
    looked.append(str(cand))
    return (str(cand) if cand.is_file() else None), looked


def cuda_archs() -> str:
    raw = os.environ.get("BITFUSE_CUDA_ARCHS", "").strip() or DEFAULT_ARCHS
    archs = [a for a in re.split(r"[;,\s]+", raw) if a]
    ok = re.compile(r"^(\d+[af]?(-real|-virtual)?|native|all|all-major)$")
    bad = [a for a in archs if not ok.match(a)]
    if bad or not archs or (len(archs) > 1 and {"native", "all", "all-major"} & set(archs)):
        raise BuildError(f"BITFUSE_CUDA_ARCHS={raw!r} is not a list of SM numbers such as "
                         f"'{DEFAULT_ARCHS}', nor 'native'")
    return ";".join(archs)


def cuda_config() -> tuple:
    """(nvcc path or None, archs) after applying BITFUSE_CUDA; prints what it decided."""
    mode = os.environ.get("BITFUSE_CUDA", "auto").strip().lower()
    if mode in ("0", "off", "false", "no"):
        print("bitfuse: building without CUDA (BITFUSE_CUDA=0)", flush=True)
        return None, ""
    if mode not in ("auto", "", "1", "on", "true", "yes"):
        raise BuildError(f"BITFUSE_CUDA={mode!r}: use auto, 0 or 1")
    required = mode not in ("auto", "")
    nvcc, looked = find_nvcc()
    nvcc_ver = _version_of([nvcc, "--version"], r"release (\d+)\.(\d+)") if nvcc else None
    if nvcc and not nvcc_ver:
        looked.append(f"{nvcc} (found, but `nvcc --version` failed)")
        nvcc = None
    if not nvcc:
        where = "; ".join(looked)
        if required:
            raise BuildError(f"BITFUSE_CUDA=1 but nvcc was not found (looked at: {where}). "
                             "Install the CUDA toolkit, or point CUDACXX or CUDA_HOME at it, "
                             "or build without CUDA: BITFUSE_CUDA=0")
        print(f"bitfuse: building without CUDA: no nvcc found (looked at: {where}); "
              "set BITFUSE_CUDA=1 to make that an error", flush=True)
        return None, ""
    archs = cuda_archs()
    shown = "native" if archs == "native" else ", ".join(f"sm_{a}" for a in archs.split(";"))
    print(f"bitfuse: building CUDA kernels for {shown} with nvcc "
          f"{nvcc_ver[0]}.{nvcc_ver[1]} ({nvcc})", flush=True)
    return nvcc, archs


class CMakeExtension(Extension):
    """An extension built by CMakeLists.txt in `sourcedir` (no sources for setuptools)."""

    def __init__(self, name: str, sourcedir: Path = ROOT):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        check_cxx()
        cmake, cmake_ver = find_cmake()
        ninja = find_ninja()
        pybind11_dir = find_pybind11()
        nvcc, archs = cuda_config()

        # setuptools wants the module at get_ext_fullpath (under build/lib*; for editable and
        # --inplace builds it copies it from there into python/bitfuse/). Build exactly that file.
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        suffix = target.name[len(ext.name.split(".")[-1]):]
        cfg = "Debug" if self.debug else "Release"
        # One CMake build tree per toolchain choice, so switching BITFUSE_CUDA or CMake never
        # reuses a cache made for another configuration.
        key = "|".join([cfg, str(nvcc), archs, sys.executable, "%d.%d" % cmake_ver])
        base = Path(self.build_temp)
        if getattr(self, "editable_mode", False):
            # setuptools gives each editable build a fresh temporary build_temp; keeping the CMake
            # tree in build/ lets a repeated `pip install -e .` recompile only what changed.
            base = ROOT / "build" / "editable"
        build_dir = base.resolve() / f"cmake-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
        build_dir.mkdir(parents=True, exist_ok=True)

        configure = [
            cmake, "-S", ext.sourcedir, "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11_dir}",
            f"-DBITFUSE_VERSION={read_version()}",
            f"-DBITFUSE_OUTPUT_DIR={target.parent}",
            f"-DBITFUSE_EXT_SUFFIX={suffix}",
            f"-DBITFUSE_CUDA={'ON' if nvcc else 'OFF'}",
        ]
        if nvcc:
            configure += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DBITFUSE_CUDA_ARCHS={archs}"]
        build = [cmake, "--build", str(build_dir)]
        jobs = os.environ.get("MAX_JOBS", "").strip()
        if jobs:
            if not jobs.isdigit() or int(jobs) < 1:
                raise BuildError(f"MAX_JOBS={jobs!r} must be a positive integer")
            build += ["--parallel", jobs]

        for what, cmd in (("configure", configure), ("build", build)):
            print("bitfuse:", " ".join(shlex.quote(c) for c in cmd), flush=True)
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                hint = (" If the CUDA part is what fails, BITFUSE_CUDA=0 builds without it."
                        if nvcc else "")
                raise BuildError(f"CMake {what} step failed (see its output above).{hint}")
        if not target.is_file():
            raise BuildError(f"the build finished but {target} was not produced")


def packages() -> list:
    """bitfuse and its subpackages (the Triton kernels are bitfuse.kernels) from python/."""
    return ["bitfuse"] + [f"bitfuse.{p}" for p in find_packages(str(ROOT / "python" / "bitfuse"))]


setup(
    version=read_version(),
    packages=packages(),
    package_dir={"bitfuse": "python/bitfuse"},
    ext_modules=[CMakeExtension("bitfuse._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
