"""Where data lives and how it is written: locations (local or object store), corpus reading, output writers (journal, Parquet, object-store parts), locks, clash checks, provenance."""
