"""The Python entry points behind the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.config import Recipe, load_recipe


def _as_recipe(recipe: str | Path | Recipe, overrides: dict[str, Any] | list[str] | None) -> Recipe:
    if isinstance(recipe, Recipe):
        if overrides:
            from distill.config import recipe_from_dict

            return recipe_from_dict(recipe.model_dump(by_alias=True), overrides)
        return recipe
    return load_recipe(recipe, overrides)


def run_recipe(
    recipe: str | Path | Recipe,
    overrides: dict[str, Any] | list[str] | None = None,
    resume: bool = False,
    show_progress: bool = True,
):
    """Train (building the student first when the recipe asks) and return the `TrainResult`."""
    from distill.train.loop import train

    return train(_as_recipe(recipe, overrides), resume=resume, show_progress=show_progress)
