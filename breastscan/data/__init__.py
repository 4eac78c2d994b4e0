"""Data: manifest contract, adapters (ingest), phantoms, validation suites, splits, CV folds, row loading."""
