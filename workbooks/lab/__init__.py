"""Research helpers for the hashguard workbooks: data, model zoo, attacks, harness, report."""
