"""The light core must run where torch is not installed (CI verify jobs)."""

import subprocess
import sys

LIGHT_MODULES = [
    "slotsmith.cli",
    "slotsmith.io.header",
    "slotsmith.io.checkpoint",
    "slotsmith.names",
    "slotsmith.layout",
    "slotsmith.inventory",
    "slotsmith.select",
    "slotsmith.plan",
    "slotsmith.digest",
    "slotsmith.manifest",
    "slotsmith.slot",
    "slotsmith.checks",
    "slotsmith.splice",
    "slotsmith.io.writer",
    "slotsmith.inspection",
    "slotsmith.verify",
]
HEAVY = ("torch", "diffusers", "transformers", "accelerate")

PROBE = """
import importlib, sys
for m in {modules!r}:
    importlib.import_module(m)
from slotsmith.cli import main
try:
    main({argv!r}, standalone_mode=False)
except SystemExit:
    pass
print(sorted(m for m in {heavy!r} if m in sys.modules))
"""


def _heavy_imported(argv):
    code = PROBE.format(modules=LIGHT_MODULES, argv=argv, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def test_importing_the_light_core_pulls_no_torch():
    assert _heavy_imported(["--help"]) == "[]"


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
