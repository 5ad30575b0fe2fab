from slimformer.recipes.schema import Recipe, apply_overrides, builtin_recipes, load_recipe

__all__ = ["Recipe", "apply_overrides", "builtin_recipes", "load_recipe"]
