import click


@click.group()
def main() -> None:
    """StepMesh on UCX."""
