"""One module per evaluation suite; each has run(runner, opts) -> SuiteResult."""
