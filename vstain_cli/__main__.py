"""``python -m vstain_cli`` (also what ``torchrun -m vstain_cli`` runs)."""

from vstain_cli.cli.main import run

if __name__ == "__main__":
    run()
