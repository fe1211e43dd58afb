"""Recipes: what to train (MedBLIP, BLIP-2, CLIP, a toy), each declaring RECIPE = framework.task.Recipe(...).

A `recipes/` folder of your own anywhere on PYTHONPATH joins this package (pkgutil.extend_path), so your recipes
can live outside this checkout: `recipe: recipes.mine` finds <your dir>/recipes/mine/.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
