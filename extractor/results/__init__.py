"""What a model's answer becomes: the judged prediction (JSON, repair, schema) and the output row."""
