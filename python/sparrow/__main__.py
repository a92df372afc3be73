"""`python -m sparrow ...`: the same as the `sparrow` command."""
from .cli import main

main()
