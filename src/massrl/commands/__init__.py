"""Sub-commands of the `massrl` CLI; cli.COMMANDS lists them."""
