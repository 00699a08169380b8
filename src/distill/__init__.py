"""distill: knowledge distillation for Hugging Face causal language models."""

from __future__ import annotations

__version__ = "0.1.0"


def run(recipe, overrides=None, resume: bool = False, show_progress: bool = True):
    """Run the pipeline the recipe describes. `overrides` maps dotted keys to values: {"training.steps": 10}."""
    from distill.api import run_recipe

    return run_recipe(recipe, overrides, resume=resume, show_progress=show_progress)


__all__ = ["run", "__version__"]
