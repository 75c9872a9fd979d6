"""``python -m stepmesh.cli ...``: the same as the ``stepmesh`` script."""

from .main import main

if __name__ == "__main__":
    main(prog_name="stepmesh")
