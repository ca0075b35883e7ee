"""The results database: schema, migrations, the store and the metrics writer."""
