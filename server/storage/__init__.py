"""Where the state that replicas share lives: an object store (a folder, or S3-compatible object
storage) for adapters, fusions and file contents, and a database (SQLite, or PostgreSQL) for records."""
