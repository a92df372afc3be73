"""`python -m sparrow.training --run NAME --out DIR`: train one run of the recipe (training/train.py). It needs torch,
the optional extra `train`; without it, say so instead of a traceback."""
import sys

try:
    from .train import main
except ModuleNotFoundError as e:
    if e.name != "torch":
        raise
    sys.exit("python -m sparrow.training needs torch, which is not installed: pip install 'sparrow[train]' "
             "(from a checkout: pip install '.[train]')")

main()
