"""The training recipe for Sparrow's shipped BlockFFN and draft models (optional extra: pip install .[train])."""
