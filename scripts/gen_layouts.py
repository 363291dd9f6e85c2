"""Write slotsmith/layouts/<model>.yaml for every known Wan model.

Run after changing ``slotsmith.layout.KNOWN_MODELS``:
    python scripts/gen_layouts.py
A test checks that the committed files equal what this writes.
"""

from slotsmith.layout import KNOWN_MODELS, layout_yaml, layouts_dir

if __name__ == "__main__":
    out = layouts_dir()
    out.mkdir(exist_ok=True)
    for model in KNOWN_MODELS.values():
        path = out / f"{model.name}.yaml"
        path.write_text(layout_yaml(model), encoding="utf-8")
        print(f"wrote {path}")
