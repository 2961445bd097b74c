"""Build csd_ext against the PyTorch installed in the current environment.

    pip install --no-build-isolation .

Environment knobs:
  FORCE_CUDA=1            build the CUDA kernels even when no GPU is visible
                          (needs a CUDA build of torch and CUDA_HOME).
  CUDA_HOME               the CUDA toolkit's root (the directory holding bin/nvcc).
  TORCH_CUDA_ARCH_LIST    GPU architectures; default "8.0;8.6;8.9;9.0;10.0;11.0;12.0+PTX"
                          (Ampere A100/A10/RTX 30, Ada L4/RTX 40, Hopper H100/H200,
                          Blackwell B200/B300, Jetson Thor, RTX 50/RTX PRO 6000/DGX
                          Spark; 10.3 and 12.1 run the 10.0 and 12.0 code, and the
                          compute_120 PTX lets newer GPUs JIT the kernels).  Each
                          architecture is one more nvcc pass over every kernel:
                          narrow the list to your GPU (e.g. "9.0") to build faster.
                          nvcc runs with -Xptxas=-v: the build log lists every
                          kernel's registers and spills (.ci/ptxas_summary.py).
  CSD_CPU_ISAS            CPU kernel variants to build, default "default,avx2,avx512"
                          on x86-64 ("default" elsewhere); the fastest one the CPU
                          supports is picked at run time, like ATen's own kernels.
                          "native": only the variant torch picks on this machine
                          (torch.backends.cpu.get_cpu_capability()) plus the portable
                          default; scripts/main.sh builds so (one compile fewer).
  CSD_DEBUG_INFO=1        keep -g (by default -g0: half the C++ compile time).
  MAX_JOBS                parallel compile jobs.
  CSD_NO_OPENMP=1         build without -fopenmp (the CPU kernel then runs on one thread
                          when torch's parallel backend is OpenMP).
"""

import glob
import os
import platform
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # plain `pip install .` builds in an isolated env without torch
    sys.exit(
        "csd_ext compiles against the PyTorch already installed in your environment, "
        "so it must be built without build isolation:\n"
        "    pip install torch && pip install --no-build-isolation .\n"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
# Every architecture CUDA 13.0's nvcc compiles SASS for, up to minor versions
# that run the same SASS (a cubin for sm_X.Y runs on sm_X.Z, Z >= Y: 10.3 runs
# the 10.0 code, 12.1 the 12.0 code); 11.0 (Thor) needs its own; +PTX on the
# newest so that GPUs newer than the list JIT the kernels from compute_120 PTX.
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0;10.0;11.0;12.0+PTX"

# Flags per CPU instruction set, as ATen uses for its own CPU kernels.
CPU_ISA_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


def read_version():
    scope = {}
    with open(os.path.join(ROOT, "csd_ext", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def cxx_standard():
    """The C++ standard this torch's headers need: C++17 up to torch 2.13,
    C++20 from 2.14 (ATen/ATen.h stops with #error below it)."""
    aten = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
    try:
        with open(aten) as f:
            return "c++20" if "202002L" in f.read() else "c++17"
    except OSError:
        return "c++17"


CXX_STD = "-std=" + cxx_standard()


def cpu_isas():
    is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    wanted = os.environ.get("CSD_CPU_ISAS", "default,avx2,avx512" if is_x86 else "default")
    if wanted.strip().lower() == "native":  # the variant ATen dispatches to on this machine
        capability = torch.backends.cpu.get_cpu_capability().lower()
        wanted = capability if is_x86 and capability in CPU_ISA_FLAGS else "default"
    isas = [s.strip().lower() for s in wanted.split(",") if s.strip()]
    unknown = [s for s in isas if s not in CPU_ISA_FLAGS]
    if unknown:
        sys.exit(f"CSD_CPU_ISAS: unknown instruction sets {unknown}; choose from {list(CPU_ISA_FLAGS)}")
    if "default" not in isas:
        isas.insert(0, "default")  # the fallback every CPU can run
    return isas


def openmp_flags():
    """-fopenmp when torch's ATen parallel backend is OpenMP.

    at::parallel_for is a header template: with the OpenMP backend its
    `#pragma omp parallel` is compiled into *our* objects, so without
    -fopenmp every parallel_for in the kernel silently runs on one thread.
    The runtime is the libgomp torch already loads (same soname).
    """
    if os.environ.get("CSD_NO_OPENMP", "0") == "1" or not torch.backends.openmp.is_available():
        return []
    if platform.system() == "Darwin":  # Apple clang needs -Xpreprocessor and a separate libomp
        return []
    return ["-fopenmp"]


def no_debug_info_flags():
    """-g0 after Python's own CFLAGS (which carry -g): debug info for torch's
    headers and our template variants doubles the C++ compile time (72 s
    against 39 s of CPU for one ISA variant, measured) and is not needed in a
    release build.  CSD_DEBUG_INFO=1 keeps it."""
    return [] if os.environ.get("CSD_DEBUG_INFO", "0") == "1" else ["-g0"]


def want_cuda():
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    has_toolkit = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    )
    if force and torch.version.cuda is None:
        sys.exit("FORCE_CUDA=1 needs a CUDA build of torch; this torch is " + torch.__version__)
    if force and not has_toolkit:
        sys.exit("FORCE_CUDA=1 needs CUDA_HOME set to the CUDA toolkit root (the directory with bin/nvcc)")
    return has_toolkit and torch.version.cuda is not None and (force or torch.cuda.is_available())


def add_pip_cuda_headers():
    """Lets the compilers find the cuBLAS/cuSPARSE/cuSOLVER headers that torch's
    CUDA headers include, from the nvidia-* wheels that torch's pip install
    brings (site-packages/nvidia/cu13/include, or nvidia/<lib>/include for
    CUDA 12), when the toolkit at CUDA_HOME lacks them.  They go on CPATH,
    which is searched after every -I, so the toolkit's own headers win."""
    toolkit_include = os.path.join(cpp_extension.CUDA_HOME, "include")
    if os.path.exists(os.path.join(toolkit_include, "cusparse.h")):
        return
    root = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
    dirs = sorted(
        d for d in glob.glob(os.path.join(root, "*", "include"))
        if any(os.path.exists(os.path.join(d, h)) for h in ("cusparse.h", "cublas_v2.h", "cusolverDn.h"))
    )
    if dirs:
        old = os.environ.get("CPATH")
        os.environ["CPATH"] = os.pathsep.join(dirs + ([old] if old else []))


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus one object per CPU instruction set.

    Each csrc/cpu/isa/csd_cpu_<isa>.cpp needs its own -m flags, which a
    setuptools Extension cannot give per file, so they are compiled here and
    linked as extra objects.  They come after the regular objects on the link
    line, so shared inline functions resolve to the baseline-ISA copies.
    """

    def build_extension(self, ext):
        isa_sources = getattr(ext, "isa_sources", {})
        if isa_sources:
            ext.extra_objects = list(ext.extra_objects or []) + self._compile_isa_objects(ext, isa_sources)
        super().build_extension(ext)
        self._write_build_info(ext)

    def _write_build_info(self, ext):
        """csd_ext/_build_info.py next to the built _C: the torch it was compiled
        against, which csd_ext checks at import (csd_ext/_torch_support.py),
        since a C++ extension only loads with that torch minor version."""
        path = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), "_build_info.py")
        cuda = "cuda" if any(s.endswith(".cu") for s in ext.sources) else None
        with open(path, "w") as f:
            f.write(
                "# Written by setup.py when csd_ext._C was built; not in the source tree.\n"
                f"TORCH_VERSION = {torch.__version__!r}\n"
                f"CUDA_VERSION = {(torch.version.cuda if cuda else None)!r}\n"
                f"CUDA_ARCH_LIST = {(os.environ.get('TORCH_CUDA_ARCH_LIST') if cuda else None)!r}\n"
            )

    def _compile_isa_objects(self, ext, isa_sources):
        from setuptools._distutils.ccompiler import new_compiler
        from setuptools._distutils.sysconfig import customize_compiler

        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        common = ["-O3", *no_debug_info_flags(), CXX_STD, "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=_C"]
        common += openmp_flags()
        include_dirs = list(ext.include_dirs) + [sysconfig.get_paths()["include"]]
        out_dir = os.path.join(self.build_temp, "cpu_isa")

        def compile_one(item):
            isa, src = item
            cc = new_compiler()
            customize_compiler(cc)
            return cc.compile(
                [src], output_dir=out_dir, include_dirs=include_dirs,
                extra_postargs=common + CPU_ISA_FLAGS[isa],
            )

        jobs = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            objects = [o for objs in pool.map(compile_one, isa_sources.items()) for o in objs]
        return objects


def make_extension():
    isas = cpu_isas()
    define_macros = [(f"CSD_HAVE_{isa.upper()}", "1") for isa in isas if isa != "default"]
    sources = [os.path.join(CSRC, "csd_ops.cpp"), os.path.join(CSRC, "cpu", "csd_cpu.cpp"),
               os.path.join(CSRC, "cpu", "csd_cpu_loss.cpp")]
    cxx_flags = ["-O3", *no_debug_info_flags(), CXX_STD] + openmp_flags()
    link_flags = openmp_flags()
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        add_pip_cuda_headers()
        cuda_dir = os.path.join(CSRC, "cuda")
        sources += sorted(os.path.join(cuda_dir, f) for f in os.listdir(cuda_dir) if f.endswith((".cu", ".cpp")))
        define_macros.append(("CSD_WITH_CUDA", "1"))
        nvcc_flags = ["-O3", CXX_STD, "-lineinfo", "-Xptxas=-v", "--expt-relaxed-constexpr"]
        ext = cpp_extension.CUDAExtension(
            "csd_ext._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags + [f"-Xcompiler={f}" for f in openmp_flags()]},
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "csd_ext._C", sources, define_macros=define_macros, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ext.isa_sources = {isa: os.path.join(CSRC, "cpu", "isa", f"csd_cpu_{isa}.cpp") for isa in isas}
    return ext


# The metadata (dependencies, extras, classifiers, URLs, console script,
# package data) is in pyproject.toml; only what needs torch at build time is here.
setup(
    version=read_version(),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
