"""One file per diffusers modular family: ``recipe(seed, gen) -> FamilyRecipe`` (see ``diffusers_families``)."""
