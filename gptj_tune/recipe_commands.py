"""`gptj-tune recipes` (the shipped recipes and their descriptions) and `recipes copy`, and where a
bare recipe name (`gptj-tune run quickstart`) is looked for."""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.table import Table

from .errors import GptjTuneError, RecipeError
from .rundir import atomic_write


def recipes_dir() -> Path:
    """Shipped recipes: inside the wheel (`gptj_tune/_recipes`) or the source checkout (`recipes/`)."""
    packaged = Path(__file__).parent / "_recipes"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "recipes"


def resolve_recipe_path(recipe: str) -> Path:
    """A recipe file, or the shipped recipe of that name."""
    path = Path(recipe)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    shipped = recipes_dir() / f"{recipe}.yaml"  # a bare name: `gptj-tune run quickstart`
    return shipped if shipped.exists() else path


def list_recipes(console) -> None:
    import yaml

    table = Table("name", "description")
    for path in sorted(recipes_dir().glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        table.add_row(path.stem, str(data.get("description", "")))
    console.print(table)
    console.print("Copy one out with: gptj-tune recipes copy NAME my.yaml")


def copy_recipe(name: str, dest: Path, force: bool, console) -> None:
    source = recipes_dir() / f"{name.removesuffix('.yaml')}.yaml"
    if not source.exists():
        names = ", ".join(p.stem for p in sorted(recipes_dir().glob("*.yaml")))
        raise RecipeError([f"no shipped recipe {name!r}; available: {names}"])
    if dest.is_dir():  # like cp: into the folder, under the recipe's own name
        dest = dest / source.name
    if dest.exists() and not force:
        raise GptjTuneError(f"{dest} already exists; pass --force to overwrite it")
    atomic_write(dest, lambda tmp: shutil.copyfile(source, tmp))
    console.print(f"Copied {name} to {dest}. Run it with: gptj-tune run {dest}", markup=False)
