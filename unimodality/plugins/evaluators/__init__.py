"""Built-in evaluators (plugin group ``unimodality.evaluators``), registered in pyproject like any plugin."""
