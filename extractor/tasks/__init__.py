"""Task bundles: the task file and its schema, templates rendered in a sandbox, prompts with few-shot turns."""
