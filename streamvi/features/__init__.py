"""Events with named fields: the feature schema, whole-fetch assembly, online normalisation, Avro."""
