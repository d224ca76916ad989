"""Reports built from finished runs: sweep tables and privacy-utility plots."""
