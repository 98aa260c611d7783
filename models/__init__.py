"""Model presets (TOML), installed as the package ``vstain_cli.presets``."""
