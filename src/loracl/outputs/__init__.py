"""What a run leaves for people and servers: the report, loading an exported adapter, export/eval/predict."""
