from slimformer.recipes.schema import Recipe, builtin_recipes, load_recipe

__all__ = ["Recipe", "builtin_recipes", "load_recipe"]
