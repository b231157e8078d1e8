"""The recipe reference in docs/recipe-reference.md, generated from the schema's field descriptions."""

from __future__ import annotations

from .inputs import LoraMethod, PromptTuningMethod, QLoraMethod, SourceSection
from .schema import Recipe, section_type


def reference_markdown() -> str:
    """The recipe reference (docs/recipe-reference.md), generated from the schema's field descriptions."""
    out = ["| key | default | description |", "| --- | --- | --- |"]

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            sub = section_type(field.annotation) if name != "method" else None
            if name == "method":
                out.append("| `method.kind` | `lora` | `full` (train every weight), `lora` (peft adapters), `qlora` "
                           "(adapters on a 4-bit base) or `prompt_tuning` (a soft prompt) |")
                walk_fields(LoraMethod, "method.", skip={"kind"}, note=" (lora, qlora)")
                walk_fields(QLoraMethod, "method.", skip=set(LoraMethod.model_fields), note=" (qlora)")
                walk_fields(PromptTuningMethod, "method.", skip={"kind"}, note=" (prompt_tuning)")
                continue
            if sub is not None and name not in ("sources", "template"):
                walk(sub, f"{key}.")
                continue
            if name == "sources":
                out.append(row(key + "[]", field))
                walk(SourceSection, f"{key}[].")
                continue
            out.append(row(key, field))

    def walk_fields(model, prefix, skip=(), note=""):
        for name, field in model.model_fields.items():
            if name not in skip:
                out.append(row(f"{prefix}{name}", field, note))

    def row(key, field, note=""):
        shown = (field.json_schema_extra or {}).get("shown_default")
        if shown:
            default = shown
        elif field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = "see below" if key.endswith("[]") else f"`{field.default_factory()}`"
        else:
            default = f"`{field.default}`" if field.default is not None else "null"
        return f"| `{key}` | {default} | {field.description or ''}{note} |"

    walk(Recipe, "")
    return "\n".join(out) + "\n"
