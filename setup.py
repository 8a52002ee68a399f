"""Build: CMake compiles csrc/ into the shared library ripple_gguf/_libripple*.so (a ggml backend
plus the control API, bound from Python through cffi in ABI mode), copies the public header next to
it and writes the binding's pre-compiled type table (ripple_gguf/_ripple_cffi.py, cffi's out-of-line
ABI mode: loading the package then parses no C). The neuron cache's test harness is a library of its
own, ripple_gguf/_ripple_cache_test.so with its header (tests only)."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def install(src: Path, dst: Path) -> None:
    """A new file renamed over the old one: processes that have the old library mapped keep it
    (copying over it in place would change the pages under them)."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = ["cmake", "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release"]
        if os.environ.get("RIPPLE_NATIVE") == "0":
            cfg.append("-DRIPPLE_NATIVE=OFF")
        if os.environ.get("RIPPLE_OPENMP") == "0":
            cfg.append("-DRIPPLE_NO_OPENMP=ON")
        subprocess.run(cfg, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 1)], check=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        install(build_dir / "libripple.so", out)
        shutil.copy2(ROOT / "csrc" / "ripple.h", out.parent / "_ripple.h")
        # also into the source tree, which is the package for in-place and editable builds
        # (setuptools copies only the extension there itself)
        for d in {out.parent, ROOT / "ripple_gguf"}:
            install(build_dir / "libripple_cache_test.so", d / "_ripple_cache_test.so")
            shutil.copy2(ROOT / "csrc" / "ripple_cache_test.h", d / "_ripple_cache_test.h")
        spec = importlib.util.spec_from_file_location("_ripple_cdef", ROOT / "ripple_gguf" / "_cdef.py")
        cdef = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cdef)
        for d in {out.parent, ROOT / "ripple_gguf"}:
            cdef.emit_module(ROOT / "csrc" / "ripple.h", d / "_ripple_cffi.py")


setup(
    ext_modules=[Extension("ripple_gguf._libripple", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
