"""Paper recipes: one config per main-table setting (README "Paper recipes"); `RECIPES` lists them."""
from configs.paper._recipe import RECIPES, REDUCED, REDUCED_MODEL, base, gpu_mesh, load, reduced
