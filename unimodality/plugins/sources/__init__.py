"""Built-in sources: AnnData files, tables, molecules (SMILES) and images."""
