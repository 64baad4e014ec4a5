"""The torchvision guard in mmfed/__init__.py (each check in a fresh interpreter: imports are global)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Loads mmfed/__init__.py's guard functions WITHOUT installing its import hook, in a process
# where neither torchvision nor mmfed has been imported yet.
_LOAD_GUARD = """
import importlib.util, types
spec = importlib.util.find_spec("mmfed")
source = open(spec.origin).read().replace("sys.meta_path.insert(0, _GuardOnFirstImport())", "pass")
guard = types.ModuleType("guard_under_test")
exec(compile(source, spec.origin, "exec"), guard.__dict__)
"""


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


def test_the_stack_imports_and_the_guard_is_active_only_without_the_extension() -> None:
    out = _run(
        """
        import mmfed
        import torchvision, open_clip, transformers, peft
        from diffusers import UNet2DConditionModel
        print(mmfed.TORCHVISION_GUARD_ACTIVE, torchvision.extension._has_ops())
        """
    )
    active, has_ops = out.split()
    assert active != has_ops  # guard active <=> torchvision's extension did not load


def test_missing_extension_defines_both_schemas() -> None:
    out = _run(
        _LOAD_GUARD + "print(guard.install_torchvision_guard(load_extension=lambda: False), "
        "guard._schema_exists('torchvision::nms'), guard._schema_exists('torchvision::qnms'))"
    )
    assert out == "True True True"


def test_loadable_extension_defines_nothing() -> None:
    out = _run(
        _LOAD_GUARD + "print(guard.install_torchvision_guard(load_extension=lambda: True), "
        "guard._schema_exists('torchvision::nms'))"
    )
    assert out == "False False"


def test_guard_is_a_no_op_once_torchvision_is_imported() -> None:
    out = _run(
        "import mmfed, torchvision\nprint(mmfed.install_torchvision_guard(load_extension=lambda: False))"
    )
    assert out == "False"


def test_importing_mmfed_imports_no_torch_until_torchvision_is_looked_for() -> None:
    out = _run(
        "import sys, mmfed\nbefore = 'torch' in sys.modules\nimport torchvision\n"
        "hooked = any(type(f).__name__ == '_GuardOnFirstImport' for f in sys.meta_path)\n"
        "print(before, 'torch' in sys.modules, hooked)"
    )
    assert out == "False True False"  # the hook ran once, at torchvision's import, and removed itself
