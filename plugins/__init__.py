"""vermeer's built-in components. Each module is a plugin written as a third party's would be,
registered through the ``vermeer`` entry-point group in pyproject.toml."""
