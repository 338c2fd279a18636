"""forge's shipped recipes: complete training programs to run, copy and edit.

Each module documents the command that runs it. See forge/recipe.py for the contract.
"""
