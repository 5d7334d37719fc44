"""Our C kernels (``*.c`` beside this file), compiled on first use and loaded with ``ctypes``.

Two live here: ``lut.c``, the lookup-table matmul palettized models decode through
(``models.lut``), and ``palette.c``, the weighted 1-D k-means that fits their tables and the
loop of GPTQ's error feedback (``models.palette``). Each is compiled with the machine's C
compiler (``-O3 -march=native -fopenmp``) into a cache directory keyed by the source, the
compiler, the flags and the CPU, and the file appears atomically, so concurrent first uses
(workers, tests) never load half of it. Where there is no compiler, or the build fails,
``load`` returns None and the caller keeps its torch path. ``EVALHUB_KERNEL_DIR`` overrides
the cache directory (default ``~/.cache/evalhub/kernels``); ``EVALHUB_NATIVE=off`` switches
every kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_signed: set[str] = set()  # libraries whose functions have their signatures set


def _cache_dir() -> Path:
    configured = os.environ.get("EVALHUB_KERNEL_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "evalhub" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _cpu() -> str:
    """The CPU's model and instruction-set flags where Linux says them, else the machine type."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return platform.machine() + "\n".join(sorted(set(lines)))


def _build(source: Path, compiler: str) -> Path:
    """Compile ``source`` unless a library from the same source, compiler and CPU is cached."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    # -march=native builds for this CPU: a cache directory shared by machines with other CPUs
    # keeps one library per instruction set
    key = hashlib.sha256(
        source.read_bytes() + version.encode() + " ".join(FLAGS).encode() + _cpu().encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run(
            [compiler, *FLAGS, str(source), "-o", str(built), "-lm"],
            capture_output=True,
            text=True,
            check=True,
        )
        os.replace(built, target)
    return target


# a function's name -> (argument types, return type), as ctypes wants them
Signatures = dict[str, tuple[list[Any], Any]]


def load(name: str, signatures: Signatures | None = None) -> ctypes.CDLL | None:
    """The compiled ``<name>.c`` beside this file with ``signatures`` set on its functions,
    built on first use (later calls, on every decoding step too, only read a dict); None where
    it cannot be built or kernels are off."""
    if name in _loaded and (signatures is None or name in _signed):
        return _loaded[name]
    with _lock:
        if name not in _loaded:
            lib = None
            compiler = _compiler()
            if os.environ.get("EVALHUB_NATIVE", "on") != "off" and compiler is not None:
                try:
                    lib = ctypes.CDLL(str(_build(Path(__file__).with_name(f"{name}.c"), compiler)))
                except (OSError, subprocess.CalledProcessError):
                    lib = None
            _loaded[name] = lib
        lib = _loaded[name]
        if signatures is not None and name not in _signed:
            for function, (argtypes, restype) in signatures.items():
                if lib is not None:
                    getattr(lib, function).argtypes = argtypes
                    getattr(lib, function).restype = restype
            _signed.add(name)
        return lib
