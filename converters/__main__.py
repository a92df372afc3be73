"""`python -m sparrow.converters SRC OUT --type q8_0`: the same command as `sparrow convert`."""
from .cli import convert_command

if __name__ == "__main__":
    convert_command(prog_name="python -m sparrow.converters")
