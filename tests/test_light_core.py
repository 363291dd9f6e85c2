"""The light core must run where torch is not installed (CI verify jobs)."""

import ast
import subprocess
import sys
from pathlib import Path

import slotsmith

PACKAGE = Path(slotsmith.__file__).parent
TORCH_SIDE = ("training", "data", "demo", "sampling")
"""The subpackages that may import torch; everything else is the light core."""
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _light_modules() -> list[str]:
    return sorted(
        _module_name(p) for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in TORCH_SIDE
    )


def _top_level_imports(path: Path) -> list[str]:
    """Modules a file imports when it is imported (imports inside functions run later, if ever)."""
    names = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


PROBE = """
import importlib, sys
for m in {heavy!r}:
    sys.modules[m] = None  # as if not installed: importing it raises ImportError
for m in {modules!r}:
    importlib.import_module(m)
from slotsmith.cli import main
try:
    main({argv!r}, standalone_mode=False)
except SystemExit:
    pass
print(sorted(m for m in {heavy!r} if sys.modules.get(m) is not None))
"""


def _heavy_imported(argv, modules=("slotsmith.cli",)):
    code = PROBE.format(modules=list(modules), argv=argv, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def test_the_rule_holds_for_every_module_outside_the_torch_side():
    """No light module imports torch or the torch side when imported: found by walking the package."""
    light = _light_modules()
    assert "slotsmith.verify" in light and "slotsmith.io.header" in light and "slotsmith.training.run" not in light
    for module in light:
        path = PACKAGE.parent.joinpath(*module.split(".")).with_suffix(".py")
        if not path.exists():
            path = path.with_suffix("") / "__init__.py"
        wrong = [
            name for name in _top_level_imports(path)
            if name.split(".")[0] in HEAVY or name.split(".")[:2] in (["slotsmith", s] for s in TORCH_SIDE)
        ]
        assert not wrong, f"{module} imports {wrong} at module level"


def test_importing_the_light_core_pulls_no_torch():
    assert _heavy_imported(["--help"], _light_modules()) == "[]"


def test_plan_runs_without_torch():
    assert _heavy_imported(["plan", "-m", "wan2.1-t2v-1.3b", "--ff", "0.01", "--ffid", "1"]) == "[]"


def test_verify_runs_without_torch(tmp_path):
    from helpers import make_checkpoint

    from slotsmith.inventory import inventory_from_checkpoint
    from slotsmith.slot import write_slot
    from slotsmith.splice import splice

    base = make_checkpoint(tmp_path / "base.safetensors")
    inv = inventory_from_checkpoint(base.path)
    name = "head.head.bias"
    slot = tmp_path / "a.slot"
    write_slot(slot, inv, {name: bytes(inv.tensors[name].numel * 4)}, selection=None, provenance={})
    out = splice(base.path, [slot], tmp_path / "out.safetensors")
    argv = ["verify", "-q", str(slot), str(out), "--base", str(base.path)]
    assert _heavy_imported(argv) == "[]"


def test_heavy_commands_without_torch_say_how_to_install_it(tmp_path):
    """A light install (no torch): train, cache and demo name the extra instead of a traceback."""
    code = """
import sys
sys.modules["torch"] = None  # as if torch were not installed: importing it raises ModuleNotFoundError
from slotsmith.cli import main
main(sys.argv[1:])
"""
    commands = {
        "train": ["train", "-b", "x.safetensors", "--cache", "c", "--ff", "0.01", "--ffid", "1", "--steps", "1",
                  "-o", "x.slot"],
        "cache": ["cache", "--data", "d.yaml", "--vae", "v", "--t5", "t", "--tokenizer", "tok"],
        "demo": ["demo", "--out", "demo-out"],
    }
    for name, argv in commands.items():
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 1, r.stderr
        assert r.stderr == f"error: slotsmith {name} needs the training extra: pip install 'slotsmith[train]'\n"
        assert not list(tmp_path.iterdir())


def test_cast_commands_run_without_torch():
    example = str(Path(__file__).parent.parent / "manifests" / "cast.example.yaml")
    assert _heavy_imported(["plan", "--cast", example]) == "[]"
    assert _heavy_imported(["verify", "--cast", example]) == "[]"
