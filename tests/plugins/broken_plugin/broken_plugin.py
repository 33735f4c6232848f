"""A plugin module that cannot be imported (test fixture): the CLI must skip it with a warning."""

raise ImportError("broken_plugin needs a package that is not installed (deliberately)")
