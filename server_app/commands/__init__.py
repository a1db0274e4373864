"""Subcommands of `koala` (see server_app.cli for the module convention)."""
