"""megatron_bppo.platform.stack: installed versions against the pinned stack (pure functions; no install touched)."""
import logging

import pytest

from megatron_bppo.errors import ConfigError
from megatron_bppo.platform import stack

PINS = stack.parse_constraints("""
# comment line
--extra-index-url https://example.invalid/simple
torch==2.13.0
vllm==0.32.0            # inline comment
Megatron_Core==0.19.2
mbridge==0.15.1
transformers==5.19.0
nvidia-cudnn-frontend>=1.29.0
pywin32==306; sys_platform == "win32"
""")
GOOD = {"torch": "2.13.0", "vllm": "0.32.0", "megatron-core": "0.19.2", "mbridge": "0.15.1",
        "transformers": "5.19.0", "nvidia-cudnn-frontend": "1.32.0"}
LINUX = {"sys_platform": "linux", "python_version": "3.12", "platform_machine": "x86_64"}


def test_parse_constraints_reads_names_specifiers_and_markers():
    assert PINS["torch"] == ("==2.13.0", None) and PINS["megatron-core"] == ("==0.19.2", None)
    assert PINS["nvidia-cudnn-frontend"] == (">=1.29.0", None)
    assert PINS["pywin32"] == ("==306", 'sys_platform == "win32"')
    assert len(PINS) == 7


def test_a_matching_install_passes():
    assert stack.find_mismatches(PINS, GOOD, environment=LINUX) == []
    # a local build label matches its release pin (PEP 440): the CPU wheel of torch
    assert stack.find_mismatches({"torch": "==2.13.0"}, {"torch": "2.13.0+cpu"}) == []


def test_a_mismatch_names_package_installed_pinned_and_fix():
    found = stack.find_mismatches(PINS, {**GOOD, "torch": "2.11.0+cu130", "Transformers": "5.17.0"},
                                  source="constraints-gpu.txt", environment=LINUX)
    assert [(m.package, m.installed, m.pinned) for m in found] == [("torch", "2.11.0+cu130", "==2.13.0"),
                                                                   ("transformers", "5.17.0", "==5.19.0")]
    text = found[0].message()
    for part in ("torch", "2.11.0+cu130 installed", "torch==2.13.0", "pip install -c constraints-gpu.txt"):
        assert part in text, (part, text)
    assert stack.find_mismatches({"x": "==1.0+cpu"}, {"x": "1.0"})[0].installed == "1.0"
    assert stack.find_mismatches({"x": ">=1.29.0"}, {"x": "1.19.1"})[0].pinned == ">=1.29.0"
    assert stack.find_mismatches({"x": "==1.0"}, {"x": "not-a-version"})[0].installed == "not-a-version"


def test_a_missing_package_is_reported_when_required():
    installed = {**GOOD, "mbridge": None}
    del installed["vllm"]                                   # absent and None both mean "not installed"
    found = stack.find_mismatches(PINS, installed, environment=LINUX)
    assert [(m.package, m.installed) for m in found] == [("mbridge", None)]       # vllm: optional
    assert "not installed" in found[0].message()
    every = stack.find_mismatches(PINS, installed, required=None, environment=LINUX)
    assert [m.package for m in every] == ["mbridge", "vllm"]
    # a pin whose marker does not apply is never reported
    assert all(m.package != "pywin32" for m in every)


def test_hard_mismatch_from_the_packages_own_requirements():
    requires = {"vllm": ["torch==2.13.0", "transformers<5.20.0,>=5.16.1", "torchaudio==2.11.0",
                         'zentorch==2.13.0.1; extra == "zen"'],
                "transformer-engine-torch": ["torch>=2.1", "transformer_engine_cu13==2.20.2"]}
    fine = {"vllm": "0.32.0", "torch": "2.13.0", "transformers": "5.19.0", "transformer-engine-torch": "2.20.2",
            "transformer-engine-cu13": "2.20.2"}
    assert stack.hard_mismatches(requires, fine, environment=LINUX) == []
    broken = {**fine, "torch": "2.11.0", "transformer-engine-cu13": "2.19.0"}     # torchaudio absent: not hard
    found = stack.hard_mismatches(requires, broken, environment=LINUX)
    assert [(m.package, m.installed, m.pinned, m.required_by) for m in found] == [
        ("transformer-engine-cu13", "2.19.0", "==2.20.2", "transformer-engine-torch 2.20.2"),
        ("torch", "2.11.0", "==2.13.0", "vllm 0.32.0")]
    assert all(m.hard for m in found) and "vllm 0.32.0 requires torch==2.13.0" in found[1].message()
    assert stack.hard_mismatches(requires, {**broken, "vllm": None}, environment=LINUX)[0].package != "torch"


@pytest.mark.parametrize("backend, raises", [("vllm", True), ("hf", False)])
def test_check_stack_raises_only_for_a_hard_mismatch_the_run_uses(monkeypatch, caplog, backend, raises):
    from types import SimpleNamespace

    hard = stack.Mismatch("torch", "2.11.0", "==2.13.0", "vllm 0.32.0", hard=True, required_by="vllm 0.32.0")
    soft = stack.Mismatch("transformers", "5.17.0", "==5.19.0", "constraints-gpu.txt")
    monkeypatch.delenv(stack.SKIP_ENV, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(stack, "stack_report", lambda cuda: (stack.Path("constraints-gpu.txt"), [soft], [hard]))
    cfg = SimpleNamespace(rollout=SimpleNamespace(backend=backend), model=SimpleNamespace(spec="auto"))
    with caplog.at_level(logging.WARNING, logger=stack.__name__):
        if raises:
            with pytest.raises(ConfigError, match="vllm 0.32.0 requires torch==2.13.0"):
                stack.check_stack(cfg, cuda=True)
        else:
            assert stack.check_stack(cfg, cuda=True) == [soft, hard]
    assert "transformers: 5.17.0 installed" in caplog.text
    monkeypatch.setenv(stack.SKIP_ENV, "1")
    assert stack.check_stack(cfg, cuda=True) == []


def test_the_repository_pins_parse_and_the_constraints_files_are_found():
    for cuda, name in ((False, "constraints.txt"), (True, "constraints-gpu.txt")):
        path = stack.constraints_path(cuda)
        assert path is not None and path.name == name
        pins = stack.parse_constraints(path.read_text())
        assert set(stack.REQUIRED) <= set(pins), (name, sorted(pins))
