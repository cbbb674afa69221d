"""Build the one Cython extension, blsfab._core, against the system libfabric."""
import os
import shlex
import subprocess
import sys

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def libfabric_flags():
    """Compile and link flags from pkg-config; stop with one line naming the package if absent."""
    try:
        cflags = subprocess.check_output(["pkg-config", "--cflags", "libfabric"], text=True)
        libs = subprocess.check_output(["pkg-config", "--libs", "libfabric"], text=True)
    except (OSError, subprocess.CalledProcessError):
        sys.exit("blsfab: libfabric headers not found by 'pkg-config libfabric'; "
                 "install them with: apt-get install libfabric-dev pkg-config")
    return shlex.split(cflags), shlex.split(libs)


def extensions():
    import numpy
    from Cython.Build import cythonize

    cflags, libs = libfabric_flags()
    ext = Extension(
        "blsfab._core",
        sources=["src/blsfab/_core.pyx"],
        include_dirs=[os.path.join(HERE, "include"), numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=cflags + ["-O3", "-Wno-unused-function"],
        extra_link_args=libs,
    )
    return cythonize([ext], language_level=3, include_path=["src"],
                     compiler_directives={"boundscheck": False, "wraparound": False,
                                          "cdivision": True, "embedsignature": True})


setup(ext_modules=extensions())
