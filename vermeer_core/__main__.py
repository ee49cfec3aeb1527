from vermeer_core.cli import entry

entry()
