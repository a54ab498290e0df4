"""Find a `tritonserver` and prepare what it needs to run vdiff's Python-backend models.

Two installations are supported. NVIDIA's container puts `tritonserver` on PATH with its backends
in /opt/tritonserver/backends; nothing needs preparing. The nvidia-pytriton wheel ships the same
2.51.0 binary, its libraries and the Python backend, but one backend stub per Python version: the
backend directory must be assembled with the stub of the running interpreter, and the stub must
find this interpreter's libpython and this environment's packages (see `server_environment`).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

CONTAINER_BACKENDS = Path("/opt/tritonserver/backends")


class TritonNotFoundError(RuntimeError):
    pass


@dataclass(frozen=True)
class TritonInstallation:
    binary: Path
    backend_source: Path  # holds python/ (libtriton_python.so, triton_python_backend_utils.py)
    stub: Path | None  # the stub of the running Python, when the installation keeps one per version
    library_dirs: tuple[Path, ...] = ()

    def backend_directory(self, workdir: Path) -> Path:
        """A --backend-directory whose Python backend runs this interpreter's stub."""
        if self.stub is None:
            return self.backend_source
        target = workdir / "backends"
        python = target / "python"
        python.mkdir(parents=True, exist_ok=True)
        for item in (self.backend_source / "python").iterdir():
            if item.is_file():
                _replace(item, python / item.name)
        _replace(self.stub, python / "triton_python_backend_stub")
        return target


def _replace(source: Path, target: Path) -> None:
    """Copy by rename: a stub still running from an earlier server cannot be written over in place."""
    partial = target.with_name(target.name + ".partial")
    shutil.copy2(source, partial)
    os.replace(partial, target)


def find_tritonserver() -> TritonInstallation:
    """The container's tritonserver when on PATH, else the one inside the nvidia-pytriton wheel."""
    on_path = shutil.which("tritonserver")
    if on_path and (CONTAINER_BACKENDS / "python").is_dir():
        return TritonInstallation(Path(on_path), CONTAINER_BACKENDS, None)
    wheel = _pytriton_installation()
    if wheel is not None:
        return wheel
    raise TritonNotFoundError(
        "no tritonserver found: run inside NVIDIA's Triton container (tritonserver on PATH), "
        "or install the wheel that ships it: pip install 'vdiff[triton]' (nvidia-pytriton==0.7.0)"
    )


def _pytriton_installation() -> TritonInstallation | None:
    spec = find_spec("pytriton")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonNotFoundError(f"nvidia-pytriton has no Python backend stub for Python {version} ({stub})")
    libs = Path(spec.origin).parent.parent / "nvidia_pytriton.libs"
    return TritonInstallation(root / "bin" / "tritonserver", root / "backends", stub, (libs,))


def server_environment(installation: TritonInstallation, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for tritonserver and its Python stubs.

    The stub links against a system libpython3.X; when this interpreter is another build of the same
    minor version, compiled modules fail to import (undefined symbol), so this interpreter's LIBDIR
    goes first. The stub takes `python3` from PATH to find site-packages, so this environment's bin
    goes first too.
    """
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR")
    library_path = [str(libdir)] if libdir else []
    library_path += [str(path) for path in installation.library_dirs]
    library_path += [part for part in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if part]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(library_path)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env
